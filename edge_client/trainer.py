"""One client's local round: a Hugging Face causal LM with a peft LoRA adapter at the client's rank.

A `LocalTrainer` wraps a base model once; `configure` switches it to another client's rank (the
adapter is rebuilt only when the LoRA configuration changes), so a simulation reuses one loaded
base model for every client by swapping adapter weights with `load_global`.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .data import IGNORE_INDEX, as_records, format_prompt, tokenize_record
from .update import LORA_A_SUFFIX, LORA_B_SUFFIX, ClientUpdate, GlobalFactors, module_names, rank_for_module, scaling

__all__ = ["TrainConfig", "LocalTrainer", "load_model", "fingerprint"]


@dataclass(kw_only=True)
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    rslora: bool = False
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    max_seq_len: int = 256
    epochs: int = 1
    max_steps: int | None = None       # bounds the round regardless of epochs
    seed: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("rank", "batch_size", "max_seq_len", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"TrainConfig.max_steps must be None or an int >= 1, got {self.max_steps!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"TrainConfig.alpha must be a positive number, got {self.alpha!r}")
        if not (self.learning_rate > 0):
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"TrainConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"TrainConfig.target_modules must be a non-empty list, got {self.target_modules!r}")
        self.target_modules = tuple(self.target_modules)
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.rank_pattern[{key!r}] must be an int >= 1, got {value!r}")
        self.rank_pattern = dict(self.rank_pattern)

    def lora_key(self) -> tuple:
        return (self.rank, tuple(sorted(self.rank_pattern.items())), self.alpha, self.rslora,
                self.target_modules, self.lora_dropout)


def load_model(name_or_path: str, *, dtype: str = "float32", local_files_only: bool = False):
    """(model, tokenizer) from a local path or hub id; failures name the model and the likely cause."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype),
                                                     local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load model {name_or_path!r}: not a local model directory and not "
                         f"reachable on the Hugging Face hub (offline? set HF_HUB_OFFLINE=0 or pass a local "
                         f"path). Cause: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def fingerprint(model) -> str:
    """sha256 of the base model's config, parameter names and shapes, and a strided sample of values."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "use_cache", "dtype", "torch_dtype"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        name = name.replace("base_model.model.", "").replace(".base_layer", "")
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].to(torch.float32).cpu().numpy()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


class LocalTrainer:
    """Local LoRA training for one client (or many, one after another, on the same base model)."""

    def __init__(self, model, tokenizer, *, config: TrainConfig | None = None, client_id: str = "client",
                 base_model_id: str | None = None):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise ValueError("model must be a plain transformers model; LocalTrainer adds the adapter itself")
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.config = config or TrainConfig()
        self.client_id = client_id
        model.config.use_cache = False
        self.base_model = base_model_id or fingerprint(model)
        self._base = model
        self.model = None
        self._lora_key = None
        self._build_adapter()

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, config: TrainConfig | None = None, client_id: str = "client",
                        dtype: str = "float32", local_files_only: bool = False) -> "LocalTrainer":
        model, tokenizer = load_model(name_or_path, dtype=dtype, local_files_only=local_files_only)
        return cls(model, tokenizer, config=config, client_id=client_id)

    # ------------------------------------------------------------------ adapter management
    def _build_adapter(self) -> None:
        from peft import LoraConfig, get_peft_model

        c = self.config
        if self.model is not None:
            self._base = self.model.unload()  # drop the LoRA layers, keep the (possibly merged) base
        lora = LoraConfig(r=c.rank, lora_alpha=c.alpha, rank_pattern=dict(c.rank_pattern), use_rslora=c.rslora,
                          target_modules=list(c.target_modules), lora_dropout=c.lora_dropout, bias="none",
                          task_type="CAUSAL_LM")
        torch.manual_seed(c.seed)
        self.model = get_peft_model(self._base, lora)
        if c.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self._lora_key = c.lora_key()

    def configure(self, config: TrainConfig | None = None, *, client_id: str | None = None, **changes) -> None:
        """Switch to another client's configuration; rebuilds the adapter only when LoRA settings change."""
        new = config or replace(self.config, **changes)
        self.config = new
        if client_id is not None:
            self.client_id = client_id
        if new.lora_key() != self._lora_key:
            self._build_adapter()

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """peft module path -> LoRA layer, e.g. 'base_model.model.model.layers.0.self_attn.q_proj'."""
        return {name: m for name, m in self.model.named_modules()
                if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}

    def module_rank(self, module: str) -> int:
        return rank_for_module(module, self.config.rank, self.config.rank_pattern)

    def module_scaling(self, module: str) -> float:
        return scaling(self.config.alpha, self.module_rank(module), self.config.rslora)

    def reset_adapter(self) -> None:
        """Fresh adapter weights (peft's init: A random, B zero) at the current rank."""
        torch.manual_seed(self.config.seed)
        for m in self.lora_modules().values():
            m.reset_lora_parameters("default", True)

    def get_factors(self) -> dict[str, np.ndarray]:
        out = {}
        for name, m in self.lora_modules().items():
            out[name + LORA_A_SUFFIX] = m.lora_A["default"].weight.detach().to(torch.float32).cpu().numpy().copy()
            out[name + LORA_B_SUFFIX] = m.lora_B["default"].weight.detach().to(torch.float32).cpu().numpy().copy()
        return out

    def set_factors(self, factors: Mapping[str, np.ndarray], *, source_scaling: Mapping[str, float] | None = None) -> None:
        """Load peft-named factors; a lower inner rank is zero-padded, B is rescaled from the sender's scaling."""
        layers = self.lora_modules()
        names = module_names(factors)
        unknown = sorted(set(names) - set(layers))
        if unknown:
            raise ValueError(f"factors name modules this model has no adapter on: {unknown[:3]}")
        with torch.no_grad():
            for name in names:
                layer = layers[name]
                a_param, b_param = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                a = np.asarray(factors[name + LORA_A_SUFFIX], dtype=np.float32)
                b = np.asarray(factors[name + LORA_B_SUFFIX], dtype=np.float32)
                r = a_param.shape[0]
                if a.shape[0] > r or a.shape[1] != a_param.shape[1] or b.shape[0] != b_param.shape[0]:
                    raise ValueError(f"factors for {name!r} have shapes A{a.shape} B{b.shape}, adapter expects "
                                     f"A{tuple(a_param.shape)} B{tuple(b_param.shape)}")
                ratio = 1.0 if source_scaling is None else source_scaling[name] / self.module_scaling(name)
                a_param.zero_()
                b_param.zero_()
                a_param[: a.shape[0]] = torch.from_numpy(a).to(a_param.dtype)
                b_param[:, : b.shape[1]] = torch.from_numpy(b * ratio).to(b_param.dtype)

    def load_global(self, factors: GlobalFactors | Mapping[str, np.ndarray]) -> None:
        """Apply the server's factors. A `GlobalFactors` whose rank differs from the adapter's rebuilds it;
        with ``merge_into_base`` its delta is merged into the base weights and a fresh adapter starts."""
        if not isinstance(factors, GlobalFactors):
            self.set_factors(factors)
            return
        g = factors
        if g.merge_into_base:
            self._merge_delta(g)
            self.reset_adapter()
            return
        if (g.rank, g.rank_pattern, g.alpha, g.rslora) != (self.config.rank, self.config.rank_pattern,
                                                           self.config.alpha, self.config.rslora):
            self.configure(rank=g.rank, rank_pattern=dict(g.rank_pattern), alpha=g.alpha, rslora=g.rslora)
        self.set_factors(g.factors)

    def _merge_delta(self, g: GlobalFactors) -> None:
        layers = self.lora_modules()
        with torch.no_grad():
            for name in g.modules():
                if name not in layers:
                    raise ValueError(f"global factors name module {name!r}, which has no adapter here")
                weight = layers[name].get_base_layer().weight
                a = torch.from_numpy(g.factors[name + LORA_A_SUFFIX])
                b = torch.from_numpy(g.factors[name + LORA_B_SUFFIX])
                delta = g.module_scaling(name) * (b @ a)
                if delta.shape != weight.shape:
                    raise ValueError(f"delta for {name!r} has shape {tuple(delta.shape)}, weight has {tuple(weight.shape)}")
                weight += delta.to(weight.dtype)

    # ------------------------------------------------------------------ training
    def _batches(self, records: Sequence[dict], rng: random.Random):
        order = list(range(len(records)))
        rng.shuffle(order)
        bs = self.config.batch_size
        for start in range(0, len(order), bs):
            yield self._collate([self._encoded[i] for i in order[start:start + bs]])

    def _collate(self, items):
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids, _ in items)
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (i, l) in enumerate(items):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(l)] = torch.tensor(l)
            mask[row, : len(i)] = 1
        return ids, mask, labels

    def train(self, data: Iterable[dict] | str, *, round: int = 0, max_steps: int | None = None) -> ClientUpdate:
        """Train the adapter for `epochs` (bounded by `max_steps`) and return the update."""
        records = as_records(data)
        c = self.config
        self._encoded = [tokenize_record(self.tokenizer, r, c.max_seq_len) for r in records]
        limit = max_steps or c.max_steps
        params = [p for p in self.model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)
        rng = random.Random(c.seed + round)
        self.model.train()
        losses, steps = [], 0
        for _ in range(c.epochs):
            for ids, mask, labels in self._batches(records, rng):
                loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                optim.step()
                optim.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                steps += 1
                if limit is not None and steps >= limit:
                    break
            if limit is not None and steps >= limit:
                break
        self.model.eval()
        metrics = {"train_loss": float(np.mean(losses)), "first_loss": losses[0], "last_loss": losses[-1],
                   "steps": float(steps)}
        return ClientUpdate(client_id=self.client_id, factors=self.get_factors(), num_examples=len(records),
                            rank=c.rank, rank_pattern=dict(c.rank_pattern), alpha=c.alpha, rslora=c.rslora,
                            base_model=self.base_model, target_modules=list(c.target_modules), round=round,
                            metrics=metrics)

    @torch.no_grad()
    def evaluate_loss(self, data: Iterable[dict] | str) -> float:
        """Mean response-token loss over the records (no gradient)."""
        records = as_records(data)
        self._encoded = [tokenize_record(self.tokenizer, r, self.config.max_seq_len) for r in records]
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(records), self.config.batch_size):
            ids, mask, labels = self._collate(self._encoded[start:start + self.config.batch_size])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(self.model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
            count += n
        return total / max(count, 1)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str] | Sequence[dict], *, max_new_tokens: int = 32) -> list[str]:
        """Greedy completions; dict prompts are formatted as Alpaca prompts."""
        self.model.eval()
        out = []
        for p in prompts:
            text = format_prompt(p) if isinstance(p, dict) else p
            ids = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            ids = torch.tensor([ids + self.tokenizer(text, add_special_tokens=False)["input_ids"]])
            gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id, use_cache=True)
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out
