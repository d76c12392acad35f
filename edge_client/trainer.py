"""One client's local round: a Hugging Face causal LM with a peft LoRA adapter at the client's rank.

This is the one trainer of the project: the device CLI (``flexlora-client train``), the Flower
ClientApp and the embedded simulation all train through :meth:`LocalTrainer.train`. A round is

1. a fresh peft adapter at the client's ``RankSpec``, initialised from the round's seed
   (peft's init: A random, B zero);
2. the server's ``GlobalFactors`` loaded into it (``B`` rescaled from the sender's scaling to
   this adapter's; slots beyond the factors' inner rank keep the fresh init), or, for FLoRA's
   ``merge_into_base``, the delta merged into the base weights and the adapter left fresh;
3. ``steps`` AdamW steps on batches drawn from a seeded, repeatedly shuffled order of the
   examples (loss on response tokens only);
4. the adapter's factors returned as a ``ClientUpdate``; the adapter is unloaded, so the base
   model is a plain transformers model between rounds.

A simulation may hand one shared base model to one ``LocalTrainer`` and run every simulated
client through it (that is why it is fast): the same code path, config, prompt and fingerprint.
(About 400 lines: the trainer, its config and model loading stay together, since every runtime
depends on them agreeing byte for byte.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checks import check_spec
from .completion import complete_rows, dead_slots
from .data import IGNORE_INDEX, as_records, collate, prompt_ids, score_answers, tokenize_record
from .targets import AUTO, has_conv1d, is_auto, is_conv1d, module_shape, resolve_targets
from .wire import LORA_A_SUFFIX, LORA_B_SUFFIX, ClientUpdate, GlobalFactors, RankSpec, module_names, scaling

__all__ = ["DEFAULT_TARGETS", "TrainConfig", "LocalTrainer", "load_model", "fingerprint", "merge_deltas"]

# Every linear projection of a LLaMA-style block (attention and MLP), as the paper adapts.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
    return value


def _positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"TrainConfig.{name} must be a finite number {'>=' if allow_zero else '>'} 0, "
                         f"got {value!r}")
    return float(value)


@dataclass(kw_only=True)
class TrainConfig:
    """How a client trains its round (the rank is the client's ``RankSpec``, not part of this)."""
    steps: int | None = 30             # optimizer steps per round; None: ``epochs`` passes over the data
    epochs: int = 1
    batch_size: int = 8
    lr: float = 5e-3
    weight_decay: float = 0.0
    alpha: float = 16.0
    rslora: bool = False
    max_length: int = 64               # tokens per example (prompt cut from the left, response kept)
    target_modules: tuple[str, ...] = AUTO    # ("auto",): every projection of the model's blocks
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            _positive_int(name, getattr(self, name))
        if self.steps is not None:
            _positive_int("steps", self.steps)
        self.lr = _positive_float("lr", self.lr)
        self.alpha = _positive_float("alpha", self.alpha)
        self.weight_decay = _positive_float("weight_decay", self.weight_decay, allow_zero=True)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"TrainConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ValueError(f"TrainConfig.target_modules must be a non-empty list, got {self.target_modules!r}")
        self.target_modules = tuple(str(t) for t in self.target_modules)
        self.rslora, self.gradient_checkpointing = bool(self.rslora), bool(self.gradient_checkpointing)

    # The Flower run config keys (``[tool.flwr.app.config]``) that set these fields.
    RUN_CONFIG_KEYS = {"local-steps": "steps", "batch-size": "batch_size", "lr": "lr", "alpha": "alpha",
                       "rslora": "rslora", "max-length": "max_length", "target-modules": "target_modules"}

    @classmethod
    def from_run_config(cls, run_config: Mapping) -> "TrainConfig":
        """The config a Flower run's settings give (keys absent: these defaults)."""
        kw = {}
        for key, name in cls.RUN_CONFIG_KEYS.items():
            if key in run_config:
                value = run_config[key]
                if name == "target_modules":
                    value = tuple(t.strip() for t in str(value).split(",") if t.strip()) or AUTO
                elif name in ("lr", "alpha") and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                elif name == "rslora" and not isinstance(value, bool):
                    raise ValueError(f"run config 'rslora' must be true or false, got {value!r}")
                kw[name] = value
        return cls(**kw)

    def lora_config(self, spec: RankSpec, *, fan_in_fan_out: bool = False):
        from peft import LoraConfig

        if is_auto(self.target_modules):
            raise ValueError("TrainConfig.target_modules is 'auto': resolve it on the model first "
                             "(edge_client.targets.resolve_targets)")
        return LoraConfig(r=spec.rank, lora_alpha=self.alpha, rank_pattern=dict(spec.rank_pattern),
                          use_rslora=self.rslora, target_modules=list(self.target_modules),
                          lora_dropout=self.lora_dropout, bias="none", task_type="CAUSAL_LM",
                          fan_in_fan_out=fan_in_fan_out)


def load_model(name_or_path: str, *, dtype: str = "float32", local_files_only: bool = False):
    """(model, tokenizer) from a registered name (``smollm2-135m``, see :mod:`edge_client.models`),
    a ``.gguf`` file, a local folder or a hub id; failures are one line naming the model and cause."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .models import model_names, resolve_model

    hf_logging.disable_progress_bar()
    try:
        resolved = resolve_model(name_or_path)
    except ValueError as exc:
        raise ValueError(f"could not load model {str(name_or_path)!r}: {exc}") from None
    local_files_only = Path(resolved).is_dir() or local_files_only
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=getattr(torch, dtype),
                                                     local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if Path(resolved).is_dir():
            raise ValueError(f"could not load model {str(name_or_path)!r} from {resolved}: {cause}") from None
        raise ValueError(f"could not load model {str(name_or_path)!r}: not a local path, not a registered name "
                         f"({', '.join(model_names())}), and not loadable as a Hugging Face hub id (offline? pass a "
                         f"local path or a registered name). Cause: {cause}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def fingerprint(model) -> str:
    """sha256 of the base model's config, parameter names and shapes, and a strided sample of
    every tensor's values: identifies the base model cheaply even for 7B+ weights."""
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


_PEFT_PREFIX = "base_model.model."


def merge_deltas(model, deltas: Mapping[str, np.ndarray]) -> None:
    """Add ``deltas`` (peft module path -> dW, d_out x d_in) to the plain model's weights in place
    (transposed into a Conv1D, which stores ``(d_in, d_out)``). Every shape is checked first."""
    modules = dict(model.named_modules())
    plan = []
    for module, dw in deltas.items():
        path = module[len(_PEFT_PREFIX):] if module.startswith(_PEFT_PREFIX) else module
        mod = modules.get(path)
        if mod is None or not hasattr(mod, "weight"):
            raise ValueError(f"delta names module {module!r}, which the model does not have")
        if module_shape(mod) != tuple(dw.shape):
            raise ValueError(f"delta for {module!r} is {tuple(dw.shape)}, the module is (d_out, d_in) = "
                             f"{module_shape(mod)}")
        plan.append((mod, np.asarray(dw, np.float32).T if is_conv1d(mod) else np.asarray(dw, np.float32)))
    with torch.no_grad():
        for mod, dw in plan:
            mod.weight.add_(torch.from_numpy(np.ascontiguousarray(dw)).to(mod.weight.dtype))


def _batches(n: int, batch_size: int, steps: int, rng: random.Random) -> Iterator[list[int]]:
    """``steps`` batches of example indices from a seeded order that is reshuffled whenever fewer
    than a batch remain (every batch is full; passes over the data run back to back)."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            extra = list(range(n))
            rng.shuffle(extra)
            order += extra
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


class LocalTrainer:
    """Local LoRA training for one client (or many simulated clients, one after another, on one base)."""

    def __init__(self, model, tokenizer, *, config: TrainConfig | None = None, spec: RankSpec | None = None,
                 client_id: str = "client", base_model_id: str | None = None):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise ValueError("model must be a plain transformers model; LocalTrainer adds the adapter itself")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.base = model
        config = config or TrainConfig()
        # the same target set as probe/plan/simulate; a name matching nothing fails here, before work
        self.config = dataclasses.replace(config, target_modules=resolve_targets(model, config.target_modules))
        self.spec = spec or RankSpec(rank=8)
        self.client_id = client_id
        self.base_model = base_model_id or fingerprint(model)
        self.factors: dict[str, np.ndarray] | None = None    # the adapter after the last train
        self.init: GlobalFactors | None = None               # the server's factors for the next round
        self.merged_round = -1                               # FLoRA: round of the last stack merged into base

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, config: TrainConfig | None = None, spec: RankSpec | None = None,
                        client_id: str = "client", dtype: str = "float32",
                        local_files_only: bool = False) -> "LocalTrainer":
        model, tokenizer = load_model(name_or_path, dtype=dtype, local_files_only=local_files_only)
        return cls(model, tokenizer, config=config, spec=spec, client_id=client_id)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """peft module path -> (d_out, d_in) of every targeted module."""
        targets = set(self.config.target_modules)
        return {_PEFT_PREFIX + n: module_shape(m) for n, m in self.base.named_modules()
                if n.rsplit(".", 1)[-1] in targets and hasattr(m, "weight") and m.weight.dim() == 2}

    def check_spec(self, spec: RankSpec, *, strict_pattern: bool = False, wire_dtype: str = "float32",
                   limits=None) -> None:
        """Before any work: every module's rank within its size and the update within the wire's caps
        (see ``checks.check_spec``)."""
        check_spec(self.module_shapes(), spec, self.config.target_modules, strict_pattern=strict_pattern,
                   wire_dtype=wire_dtype, limits=limits)

    # ------------------------------------------------------------------ what the server sends
    def load_global(self, g: GlobalFactors | None) -> None:
        """Take the server's message: FLoRA's ``merge_into_base`` is merged into the base weights
        now (the next adapter starts fresh); other factors initialise the next round's adapter."""
        if g is None:
            self.init = None
        elif g.merge_into_base:
            # a stack is merged once: after a round the server did not commit it sends the same
            # stack (same producing round) again
            if g.round > self.merged_round:
                merge_deltas(self.base, {m: g.module_delta(m) for m in g.modules()})
                self.merged_round = int(g.round)
            self.init, self.factors = None, None
        else:
            self.init = g

    # ------------------------------------------------------------------ the adapter
    @contextlib.contextmanager
    def adapter(self, spec: RankSpec | None = None, *, seed: int = 0,
                factors: Mapping[str, np.ndarray] | GlobalFactors | None = None):
        """A peft model over the base with a fresh adapter at ``spec`` (seeded) and ``factors``
        loaded (a ``GlobalFactors`` is rescaled from its scaling); unloaded on exit."""
        from peft import get_peft_model

        spec = spec or self.spec
        torch.manual_seed(seed)
        use_cache, self.base.config.use_cache = getattr(self.base.config, "use_cache", None), False
        peft_model = get_peft_model(self.base, self.config.lora_config(spec, fan_in_fan_out=has_conv1d(self.base)))
        try:
            if factors is not None:
                _load_factors(peft_model, factors, self.config, spec)
            if self.config.gradient_checkpointing:
                peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                peft_model.enable_input_require_grads()
            yield peft_model
        finally:
            peft_model.eval()
            if self.config.gradient_checkpointing:
                peft_model.gradient_checkpointing_disable()
            peft_model.unload()
            self.base.config.use_cache = use_cache

    def current(self):
        """:meth:`adapter` with the factors of the last round (or the server's, before any)."""
        return self.adapter(factors=self.factors if self.factors is not None else self.init)

    # ------------------------------------------------------------------ training
    def _collate(self, items: Sequence[tuple[list[int], list[int]]]):
        return collate(items, self.tokenizer.pad_token_id)

    def _steps(self, n: int) -> int:
        c = self.config
        return c.steps if c.steps is not None else c.epochs * math.ceil(n / c.batch_size)

    def train(self, data: Iterable[dict] | str, *, round: int = 0, seed: int | None = None,
              spec: RankSpec | None = None, client_id: str | None = None) -> ClientUpdate:
        """One local round from ``self.init`` (see the module docstring); returns the update."""
        records = as_records(data)
        c = self.config
        spec = spec or self.spec
        self.check_spec(spec)
        seed = round if seed is None else int(seed)
        encoded = [tokenize_record(self.tokenizer, r, c.max_length) for r in records]
        rng = random.Random(seed)
        losses: list[float] = []
        with self.adapter(spec, seed=seed, factors=self.init) as model:
            params = [p for p in model.parameters() if p.requires_grad]
            optim = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
            model.train()
            for idx in _batches(len(encoded), c.batch_size, self._steps(len(encoded)), rng):
                ids, mask, labels = self._collate([encoded[i] for i in idx])
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                optim.step()
                optim.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            factors = {}
            for name, p in model.named_parameters():
                if ".lora_A.default." in name or ".lora_B.default." in name:
                    factors[name.replace(".default.", ".")] = p.detach().to(torch.float32).cpu().numpy().copy()
        self.factors, self.init = factors, None
        metrics = {"train_loss": float(np.mean(losses[-max(1, len(losses) // 2):])), "first_loss": losses[0],
                   "last_loss": losses[-1], "steps": float(len(losses))}
        return ClientUpdate(client_id=client_id or self.client_id, factors=factors, num_examples=len(records),
                            rank=spec.rank, rank_pattern=dict(spec.rank_pattern), alpha=c.alpha, rslora=c.rslora,
                            base_model=self.base_model, target_modules=list(c.target_modules), round=round,
                            metrics=metrics)

    @torch.no_grad()
    def evaluate_loss(self, data: Iterable[dict] | str) -> float:
        """Mean response-token loss over the records with the current adapter (no gradient)."""
        records = as_records(data)
        encoded = [tokenize_record(self.tokenizer, r, self.config.max_length) for r in records]
        total, count = 0.0, 0
        with self.current() as model:
            for start in range(0, len(encoded), self.config.batch_size):
                ids, mask, labels = self._collate(encoded[start:start + self.config.batch_size])
                n = int((labels[:, 1:] != IGNORE_INDEX).sum())
                total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
                count += n
        return total / max(count, 1)

    def evaluate_answers(self, data: Iterable[dict] | str) -> dict[str, float]:
        """Teacher-forced scores of the response tokens with the current adapter
        (:func:`edge_client.data.score_answers`: ``loss`` per token, as :meth:`evaluate_loss`,
        ``token_accuracy`` and ``exact``)."""
        with self.current() as model:
            return score_answers(model, self.tokenizer, as_records(data), max_length=self.config.max_length,
                                 batch_size=self.config.batch_size)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str] | Sequence[dict], *, max_new_tokens: int = 32) -> list[str]:
        """Greedy completions with the current adapter; dict prompts are formatted as records."""
        out = []
        with self.current() as model:
            for p in prompts:
                ids = torch.tensor([prompt_ids(self.tokenizer, p)])
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                     eos_token_id=self.tokenizer.eos_token_id, use_cache=True)
                out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out


def _load_factors(peft_model, factors: Mapping[str, np.ndarray] | GlobalFactors, config: TrainConfig,
                  spec: RankSpec) -> None:
    """Copy factors into the adapter's first slots; ``B`` is rescaled from the sender's scaling
    (a ``GlobalFactors``') to this adapter's. Slots with no direction (beyond the sent rank, or
    sent with both ``A`` row and ``B`` column zero) get the orthonormal completion of
    ``edge_client.completion`` (unit ``A`` rows orthogonal to the sent ones, ``B`` zero), the
    same rule the server applies, so every slot has a gradient."""
    source = factors if isinstance(factors, GlobalFactors) else None
    tensors = source.factors if source is not None else factors
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for module in module_names(tensors):
            a_name, b_name = f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"
            if a_name not in params:
                raise ValueError(f"factors name module {module!r}, which has no adapter here")
            a_param, b_param = params[a_name], params[b_name]
            a = np.asarray(tensors[module + LORA_A_SUFFIX], np.float32)
            b = np.asarray(tensors[module + LORA_B_SUFFIX], np.float32)
            r = a_param.shape[0]
            if a.shape[0] > r or a.shape[1] != a_param.shape[1] or b.shape[0] != b_param.shape[0]:
                raise ValueError(f"factors for {module!r} have shapes A{a.shape} B{b.shape}, the adapter "
                                 f"expects at most A{tuple(a_param.shape)} B{tuple(b_param.shape)}")
            if source is not None:
                b = b * (source.module_scaling(module) / scaling(config.alpha, r, config.rslora))
            full_a = np.zeros((r, a.shape[1]), np.float32)
            full_b = np.zeros((b.shape[0], r), np.float32)
            full_a[: a.shape[0]], full_b[:, : b.shape[1]] = a, b
            dead = dead_slots(full_a, full_b)
            if dead.any():
                full_a = complete_rows(full_a, dead).astype(np.float32)
            a_param.copy_(torch.from_numpy(full_a).to(a_param.dtype))
            b_param.copy_(torch.from_numpy(np.ascontiguousarray(full_b)).to(b_param.dtype))
