"""A simulated client's local round: LoRA (peft) training on its examples, from the server's
factors, returning a ``ClientUpdate`` in peft naming.

The embedded runtime keeps one base model in memory and wraps it with a fresh peft adapter
per client (then unloads it), which is what makes 20 clients per round fit in seconds on a
CPU. The prompt format and response-only loss follow the edge client's trainer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge_client.update import ClientUpdate, GlobalFactors

from ..strategies.base import RankSpec
from .model import TARGET_MODULES
from .suite import format_prompt

__all__ = ["TrainConfig", "encode_examples", "train_client"]


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 12
    batch_size: int = 8
    lr: float = 1e-2
    alpha: float = 16.0
    max_length: int = 64
    target_modules: Sequence[str] = tuple(TARGET_MODULES)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if not self.alpha > 0:
            raise ValueError(f"TrainConfig.alpha must be positive, got {self.alpha!r}")


def encode_examples(tokenizer, examples: Sequence[Mapping[str, str]], max_length: int):
    """Token ids and labels (prompt masked with -100) per example."""
    out = []
    for ex in examples:
        prompt = [tokenizer.bos_token_id] + tokenizer(format_prompt(ex["instruction"], ex.get("input", "")),
                                                      add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_length]
        labels = ([-100] * len(prompt) + answer)[:max_length]
        out.append((ids, labels))
    return out


def _collate(batch, pad_id: int):
    import torch

    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, mask, labels


def _load_factors(peft_model, init: GlobalFactors | None) -> None:
    """Copy the server's factors into the adapter; slots beyond the sent rank keep peft's
    fresh initialisation (A random, B zero)."""
    if init is None or init.merge_into_base:
        return
    import torch

    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in init.factors.items():
            module, kind = key.rsplit(".lora_", 1)           # kind: "A.weight" or "B.weight"
            pname = f"{module}.lora_{kind[0]}.default.weight"
            if pname not in params:
                raise ValueError(f"server factors name {key!r}, which the adapter does not have")
            p, v = params[pname], torch.from_numpy(np.asarray(value, np.float32))
            # rescale from the server's scaling to this adapter's (alpha and rank may differ)
            if kind[0] == "B":
                r_local = p.shape[1]
                s_local = peft_model.peft_config["default"].lora_alpha / r_local
                v = v * (init.module_scaling(module) / s_local)
                p[:, : v.shape[1]] = v
            else:
                p[: v.shape[0], :] = v


def train_client(model, tokenizer, *, client_id: str, examples: Sequence[Mapping[str, str]],
                 spec: RankSpec, init: GlobalFactors | None, config: TrainConfig, seed: int,
                 base_model: str, round: int) -> ClientUpdate:
    """Train a fresh peft adapter on ``model`` (left unchanged afterwards) and return the update."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    rng = random.Random(seed)
    lcfg = LoraConfig(r=spec.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                      rank_pattern=dict(spec.rank_pattern), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    try:
        _load_factors(peft_model, init)
        data = encode_examples(tokenizer, examples, config.max_length)
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=config.lr,
                                weight_decay=0.0)
        peft_model.train()
        losses = []
        order: list[int] = []
        for _ in range(config.steps):
            if len(order) < config.batch_size:
                extra = list(range(len(data)))
                rng.shuffle(extra)
                order += extra
            idx, order = order[: config.batch_size], order[config.batch_size:]
            ids, mask, labels = _collate([data[i] for i in idx], tokenizer.pad_token_id)
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.item()))
        factors = {}
        for name, p in peft_model.named_parameters():
            if ".lora_A.default." in name or ".lora_B.default." in name:
                factors[name.replace(".default.", ".")] = p.detach().cpu().numpy().astype(np.float32).copy()
    finally:
        peft_model.eval()
        peft_model.unload()
    return ClientUpdate(client_id=client_id, factors=factors, num_examples=len(examples), rank=spec.rank,
                        rank_pattern=dict(spec.rank_pattern), alpha=float(config.alpha), rslora=False,
                        base_model=base_model, target_modules=list(config.target_modules), round=round,
                        metrics={"train_loss": float(np.mean(losses[-max(1, len(losses) // 2):]))})
