"""Held-out evaluation: greedy generation, Rouge-L (``rouge-score``) and exact match."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["evaluate", "score"]


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean Rouge-L F1 (word level, as rouge-score tokenises) and exact match."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("references must be non-empty")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references))
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    n = len(references)
    return {"rougeL": rouge / n, "exact_match": exact / n}


def generate(model, tokenizer, examples: Sequence[Mapping[str, str]], *, max_new_tokens: int = 16,
             batch_size: int = 32) -> list[str]:
    import torch

    from .local_train import encode_examples

    prompts = []
    for ids, labels in encode_examples(tokenizer, examples, max_length=10_000):
        prompts.append([t for t, l in zip(ids, labels) if l == -100])
    outs: list[str] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            n = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), n), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for j, p in enumerate(chunk):  # left padding for generation
                ids[j, n - len(p):] = torch.tensor(p)
                mask[j, n - len(p):] = 1
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row in gen[:, n:]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                outs.append(text.split("\n")[0].strip())
    return outs


def evaluate(model, tokenizer, examples: Sequence[Mapping[str, str]], **kw) -> dict[str, float]:
    preds = generate(model, tokenizer, examples, **kw)
    return score(preds, [ex["output"] for ex in examples])
