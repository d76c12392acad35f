"""Held-out evaluation: greedy generation, Rouge-L (``rouge-score``), exact match and the
teacher-forced loss of the responses, of the base model plus a global weight delta."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from edge_client.data import IGNORE_INDEX, prompt_ids, score_answers, tokenize_record
from server.workloads.model import apply_delta

__all__ = ["Evaluator", "evaluate", "generate", "heldout_loss", "score", "onnx_evaluate"]


class _UnicodeTokenizer:
    """rouge-score's own tokenisation (lower case, runs of ``[a-z0-9]``) for ASCII text, plus every
    other non-space character as a token of its own. rouge-score drops everything outside
    ``[a-z0-9]``, so an answer such as ``ˣ`` (the real suite's ``unicode_char`` task) or ``€`` has no
    tokens and scores 0 even when it is exactly right; on ASCII text both give the same tokens."""

    _pattern = re.compile(r"[a-z0-9]+|[^\x00-\x7f\s]")

    def tokenize(self, text: str) -> list[str]:
        return self._pattern.findall(text.lower())


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean Rouge-L F1 (word level: rouge-score's tokens, plus non-ASCII characters, see
    :class:`_UnicodeTokenizer`) and exact match."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("references must be non-empty")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_UnicodeTokenizer())
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references))
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    n = len(references)
    return {"rougeL": rouge / n, "exact_match": exact / n}


def generate(model, tokenizer, examples: Sequence[Mapping[str, str]], *, max_new_tokens: int = 16,
             batch_size: int = 32) -> list[str]:
    """Greedy completions (first line) of the examples' prompts, batched with left padding."""
    import torch

    prompts = [prompt_ids(tokenizer, ex) for ex in examples]
    outs: list[str] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            n = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), n), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for j, p in enumerate(chunk):
                ids[j, n - len(p):] = torch.tensor(p)
                mask[j, n - len(p):] = 1
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row in gen[:, n:]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                outs.append(text.split("\n")[0].strip())
    return outs


def heldout_loss(model, tokenizer, examples: Sequence[Mapping[str, str]], *, batch_size: int = 32,
                 max_length: int = 128) -> float:
    """Teacher-forced cross-entropy of the responses (token mean): a far less noisy signal than
    greedy-generation Rouge-L on a small held-out set."""
    return score_answers(model, tokenizer, examples, max_length=max_length, batch_size=batch_size)["loss"]


def onnx_evaluate(lm, tokenizer, examples: Sequence[Mapping[str, str]], *, max_new_tokens: int = 16,
                  max_length: int = 128) -> dict:
    """The held-out measures of an exported graph (``edge_client.export_kv.OnnxKVLM``, or anything
    with ``greedy(ids, n, eos_token_id)`` and ``logits(ids[batch, seq])``): greedy completions (first
    line, as :func:`generate`) scored by :func:`score`, and the teacher-forced response loss (as
    :func:`heldout_loss`), one example at a time. Returns the scores and the ``predictions``."""
    preds: list[str] = []
    total, count = 0.0, 0
    for ex in examples:
        out = lm.greedy(prompt_ids(tokenizer, ex), max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        preds.append(tokenizer.decode(out, skip_special_tokens=True).split("\n")[0].strip())
        ids, labels = tokenize_record(tokenizer, ex, max_length)
        logits = np.asarray(lm.logits(np.array([ids], np.int64))[0, :-1], np.float64)
        target = np.array(labels[1:])
        keep = target != IGNORE_INDEX
        z = logits[keep]
        top = z.max(axis=1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
        total += float((logz - z[np.arange(len(z)), target[keep]]).sum())
        count += int(keep.sum())
    return {**score(preds, [ex["output"] for ex in examples]), "heldout_loss": total / max(count, 1),
            "predictions": preds}


def evaluate(model, tokenizer, examples: Sequence[Mapping[str, str]], **kw) -> dict[str, float]:
    preds = generate(model, tokenizer, examples, **kw)
    return score(preds, [ex["output"] for ex in examples])


class Evaluator:
    """Scores ``base + delta`` on the held-out examples: Rouge-L, exact match, held-out loss and,
    with ``families``, Rouge-L per task family (``category``) and the first ``samples`` (reference,
    answer) pairs of each. With ``recall_examples`` (examples
    the federation trains on, e.g. the facts suite's facts) it also scores how much of its own data
    the global model has learnt, teacher-forced (:func:`edge_client.data.score_answers`):
    ``recall_exact`` (the share answered exactly by greedy decoding), ``recall_token_accuracy`` and
    ``recall_loss``: on every call, or with ``recall_every_call=False`` only through :meth:`recall`
    (a forward pass per fact: on a real model as costly as a few training steps). Owns ``model``
    (reset per call)."""

    def __init__(self, model, tokenizer, base_state: Mapping, examples: Sequence[Mapping[str, str]], *,
                 max_new_tokens: int = 16, families: bool = False, samples: int = 2, loss: bool = True,
                 recall_examples: Sequence[Mapping[str, str]] = (), recall_every_call: bool = True) -> None:
        if not examples:
            raise ValueError("examples must be non-empty")
        self.model, self.tokenizer, self.base_state = model, tokenizer, base_state
        self.examples = list(examples)
        self.recall_examples = list(recall_examples)
        self.max_new_tokens, self.families, self.samples, self.loss = max_new_tokens, families, samples, loss
        self.recall_every_call = recall_every_call

    def recall(self, delta: Mapping[str, np.ndarray]) -> dict[str, float]:
        """``recall_exact``, ``recall_token_accuracy`` and ``recall_loss`` of ``base + delta`` on
        the recall examples ({} without them)."""
        if not self.recall_examples:
            return {}
        apply_delta(self.model, self.base_state, delta)
        return self._recall()

    def _recall(self) -> dict[str, float]:
        scores = score_answers(self.model, self.tokenizer, self.recall_examples, max_length=128)
        return {f"recall_{k}": v for k, v in scores.items()}

    def __call__(self, delta: Mapping[str, np.ndarray]) -> dict:
        apply_delta(self.model, self.base_state, delta)
        preds = generate(self.model, self.tokenizer, self.examples, max_new_tokens=self.max_new_tokens)
        refs = [ex["output"] for ex in self.examples]
        out: dict = score(preds, refs)
        if self.families:
            groups: dict[str, list[int]] = {}
            for i, ex in enumerate(self.examples):
                groups.setdefault(ex.get("category") or "default", []).append(i)
            ordered = sorted(groups.items())
            out["families"] = {f: score([preds[i] for i in idx], [refs[i] for i in idx])["rougeL"]
                               for f, idx in ordered}
            # what the model answered (reference, answer), the first few per family: a score of 0
            # says nothing of whether the answer was empty, a code where a phrase was asked, ...
            out["samples"] = {f: [[refs[i], preds[i]] for i in idx[:self.samples]] for f, idx in ordered}
        if self.loss:
            out["heldout_loss"] = heldout_loss(self.model, self.tokenizer, self.examples)
        if self.recall_examples and self.recall_every_call:
            out.update(self._recall())
        return out
