"""Compute-aware rank choice: how long a round's local training takes at each candidate rank.

Time model (one optimizer step, batch B, sequence T, n = B*T tokens):

  flops(r) = fwd + bwd,  fwd = 2 n P_lin + 4 B T^2 d_model L + 2 n sum_m r_m (d_in + d_out)
  bwd      = 2 n P_lin + 8 B T^2 d_model L + 4 n sum_m r_m (d_in + d_out)   (+ fwd again with checkpointing)
  t(r)     = t0 + base flops / rate + LoRA flops / lora_rate

``P_lin`` counts the weights of every linear/Conv1D layer (LM head included); the frozen base
needs input gradients only (one GEMM per layer backward), LoRA factors both. ``rate`` (effective
FLOP/s of this device on this model), ``lora_rate`` (thin LoRA GEMMs run far below it) and ``t0``
(per-step framework overhead: optimizer, kernel launches, Python) are calibrated on the device by
timing a few real training steps of the very model at two sequence lengths and one high rank
(:func:`calibrate`). A round is ``steps * t(r)``.

:func:`choose_rank_for_deadline` keeps the memory choice of ``rank_policy.choose_rank`` and then
drops every candidate whose predicted round time exceeds the deadline; on battery and low charge
(psutil) it takes the smallest fitting rank or refuses the round, as configured. The reasons are
carried as the memory policy carries them.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = ["TimeModel", "step_flops", "step_flops_parts", "measure_step_seconds", "calibrate", "calibration_rows",
           "fit_time_model", "battery_state",
           "choose_rank_for_deadline"]


_SHAPES: dict[str, tuple] = {}


def _shapes_of(model_or_config, targets):
    """(config, weights of all linear layers, {targeted module: (d_out, d_in)}), memoised for configs."""
    if hasattr(model_or_config, "named_modules"):
        return _shapes_of_model(model_or_config, targets)
    import json

    key = json.dumps(model_or_config.to_dict(), sort_keys=True, default=str) + repr(tuple(targets))
    if key not in _SHAPES:
        from .targets import meta_model

        _SHAPES[key] = _shapes_of_model(meta_model(model_or_config), targets)
    return _SHAPES[key]


def _shapes_of_model(model, targets):
    from .targets import is_conv1d, module_shape, resolve_targets

    targets = set(resolve_targets(model, targets))
    linear_params, lora_shapes = 0, {}
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or is_conv1d(mod):
            o, i = module_shape(mod)
            linear_params += o * i
            if name.rsplit(".", 1)[-1] in targets:
                lora_shapes["base_model.model." + name] = (o, i)
    return model.config, linear_params, lora_shapes


def step_flops(model_or_config, targets, spec, *, batch: int, seq_len: int,
               gradient_checkpointing: bool = False) -> float:
    """FLOPs of one LoRA training step (see the module docstring)."""
    return sum(step_flops_parts(model_or_config, targets, spec, batch=batch, seq_len=seq_len,
                                gradient_checkpointing=gradient_checkpointing))


def step_flops_parts(model_or_config, targets, spec, *, batch: int, seq_len: int,
                     gradient_checkpointing: bool = False) -> tuple[float, float]:
    """(base FLOPs, LoRA FLOPs) of one step: thin LoRA GEMMs run at their own rate."""
    config, p_lin, lora = _shapes_of(model_or_config, targets)
    n = batch * seq_len
    layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1))
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd"))
    lora_inner = sum(spec.module_rank(m) * (o + i) for m, (o, i) in lora.items())
    attn = batch * seq_len * seq_len * hidden * layers
    base_fwd, lora_fwd = 2 * n * p_lin + 4 * attn, 2 * n * lora_inner
    base = base_fwd + 2 * n * p_lin + 8 * attn + (base_fwd if gradient_checkpointing else 0)
    lora_f = lora_fwd + 2 * lora_fwd + (lora_fwd if gradient_checkpointing else 0)
    return float(base), float(lora_f)


def measure_step_seconds(trainer, spec, *, batch: int, seq_len: int, steps: int = 3, warmup: int = 1,
                         stat: str = "median") -> float:
    """Median (or min) seconds of ``steps`` real AdamW steps of ``trainer``'s model at ``spec`` (random tokens)."""
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = int(trainer.base.config.vocab_size)
    ids = torch.randint(3, vocab, (batch, seq_len), generator=g)
    times = []
    with trainer.adapter(spec, seed=0) as model:
        optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        for k in range(warmup + steps):
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            if k >= warmup:
                times.append(time.perf_counter() - t)
    times.sort()
    return times[0] if stat == "min" else times[len(times) // 2]


@dataclass(kw_only=True)
class TimeModel:
    """``t(step) = overhead_s + flops / flops_per_s``, calibrated on this device for one model."""
    flops_per_s: float
    overhead_s: float
    calibration: list[dict]
    lora_flops_per_s: float | None = None    # None: LoRA FLOPs at the base rate

    def step_seconds(self, model_or_config, targets, spec, *, batch: int, seq_len: int,
                     gradient_checkpointing: bool = False) -> float:
        base, lora = step_flops_parts(model_or_config, targets, spec, batch=batch, seq_len=seq_len,
                                      gradient_checkpointing=gradient_checkpointing)
        return self.overhead_s + base / self.flops_per_s + lora / (self.lora_flops_per_s or self.flops_per_s)

    def round_seconds(self, model_or_config, targets, spec, *, steps: int, batch: int, seq_len: int,
                      gradient_checkpointing: bool = False) -> float:
        return steps * self.step_seconds(model_or_config, targets, spec, batch=batch, seq_len=seq_len,
                                         gradient_checkpointing=gradient_checkpointing)

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(trainer, *, spec=None, batch: int = 1, seq_lens: Sequence[int] = (16, 128), steps: int = 3,
              high_rank: int | None = 128, warmup: int = 1) -> TimeModel:
    """Fit ``overhead_s`` and ``flops_per_s`` to real steps at two (or more) sequence lengths at
    ``spec`` (default rank 4), and, with ``high_rank``, ``lora_flops_per_s`` to one more step at that
    rank and the longest length. Each point is the median of its steps: a round's time is a sum of
    steps, so the typical step (not the fastest) is what the prediction must match."""
    return fit_time_model(calibration_rows(trainer, spec=spec, batch=batch, seq_lens=seq_lens, steps=steps,
                                           high_rank=high_rank, warmup=warmup))


def calibration_rows(trainer, *, spec=None, batch: int = 1, seq_lens: Sequence[int] = (16, 128), steps: int = 3,
                     high_rank: int | None = 128, warmup: int = 1) -> list[dict]:
    """The timed steps :func:`calibrate` fits: one row per (sequence length, rank) point."""
    from .wire import RankSpec

    spec = spec or RankSpec(rank=4)
    points = [(int(seq), spec) for seq in seq_lens]
    if high_rank:
        points.append((int(max(seq_lens)), RankSpec(rank=int(high_rank))))
    rows = []
    for seq, sp in points:
        t = measure_step_seconds(trainer, sp, batch=batch, seq_len=seq, steps=steps, warmup=warmup, stat="median")
        base, lora = step_flops_parts(trainer.base, trainer.config.target_modules, sp, batch=batch, seq_len=seq)
        rows.append({"seq_len": seq, "batch": batch, "rank": sp.rank, "seconds": t, "base_flops": base,
                     "lora_flops": lora})
    return rows


def fit_time_model(rows: Sequence[Mapping]) -> TimeModel:
    """Least-squares fit of ``overhead + base/rate [+ lora/lora_rate]`` to calibration rows (relative
    errors weighted equally, so short steps count as much as long ones). The LoRA rate is fitted
    only when the rows span more than one rank and the fit is physical (all terms positive);
    otherwise LoRA FLOPs run at the base rate."""
    import numpy as np

    rows = [dict(r) for r in rows]
    y = np.array([r["seconds"] for r in rows], dtype=float)
    w = 1.0 / y
    if len({r["rank"] for r in rows}) > 1 and len(rows) >= 3:
        x = np.array([[1.0, r["base_flops"], r["lora_flops"]] for r in rows])
        (t0, inv_base, inv_lora), *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        if t0 >= 0 and inv_base > 0 and inv_lora > 0:
            return TimeModel(flops_per_s=float(1 / inv_base), overhead_s=float(t0), calibration=rows,
                             lora_flops_per_s=float(1 / inv_lora))
    x = np.array([[1.0, r["base_flops"] + r["lora_flops"]] for r in rows])
    (t0, inv_rate), *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
    if t0 < 0:   # no measurable overhead: the line through the origin
        t0, inv_rate = 0.0, float(np.sum(w * w * x[:, 1] * y) / np.sum(w * w * x[:, 1] ** 2))
    if inv_rate <= 0:   # noise swamped the slope: all time is per-FLOP at the largest point
        t0, inv_rate = 0.0, y[-1] / x[-1, 1]
    return TimeModel(flops_per_s=float(1.0 / inv_rate), overhead_s=float(t0), calibration=rows)


def battery_state() -> dict | None:
    """``{"percent", "plugged"}`` from psutil, or None where there is no battery."""
    import psutil

    fn = getattr(psutil, "sensors_battery", None)
    b = fn() if fn else None
    return None if b is None else {"percent": float(b.percent), "plugged": bool(b.power_plugged)}


def choose_rank_for_deadline(profile, model_or_config, ranks: Sequence[int], *, time_model: TimeModel,
                             deadline_s: float, steps: int, targets=("auto",), batch: int = 1, seq_len: int = 256,
                             gradient_checkpointing: bool = False, dtype: str = "float32",
                             battery: Mapping | None = None, battery_low: float = 20.0,
                             on_low_battery: str = "smaller"):
    """The largest rank that fits memory and whose predicted round time is within ``deadline_s``.

    ``on_low_battery``: "ignore", "smaller" (smallest fitting rank) or "skip" (refuse the round)
    when ``battery`` says unplugged and below ``battery_low`` percent.
    """
    from .rank_policy import NoRankFitsError, choose_rank
    from .wire import RankSpec

    if on_low_battery not in ("ignore", "smaller", "skip"):
        raise ValueError(f"on_low_battery must be ignore, smaller or skip, got {on_low_battery!r}")
    if not deadline_s > 0:
        raise ValueError(f"deadline_s must be > 0, got {deadline_s!r}")
    config = model_or_config.config if hasattr(model_or_config, "named_modules") else model_or_config
    predicted = {r: time_model.round_seconds(model_or_config, targets, RankSpec(rank=r), steps=steps, batch=batch,
                                             seq_len=seq_len, gradient_checkpointing=gradient_checkpointing)
                 for r in ranks}
    in_time = [r for r in ranks if predicted[r] <= deadline_s]
    if not in_time:
        r0 = min(ranks)
        raise NoRankFitsError(f"no rank finishes in the deadline: rank {r0} needs {predicted[r0]:.1f} s for {steps} "
                              f"steps (> {deadline_s:g} s); fewer steps, a shorter sequence or a later deadline",
                              needed_bytes=0, available_bytes=0)
    low = battery is not None and not battery.get("plugged", True) and battery.get("percent", 100) < battery_low
    if low and on_low_battery == "skip":
        raise NoRankFitsError(f"on battery at {battery['percent']:.0f}% (< {battery_low:g}%): skipping this round",
                              needed_bytes=0, available_bytes=0)
    choice = choose_rank(profile, config, in_time, targets=targets, batch=batch, seq_len=seq_len, dtype=dtype,
                         gradient_checkpointing=gradient_checkpointing)
    if low and on_low_battery == "smaller":
        fitting = sorted(c["rank"] for c in choice.considered if c["fits"])
        choice = choose_rank(profile, config, fitting[:1], targets=targets, batch=batch, seq_len=seq_len,
                             dtype=dtype, gradient_checkpointing=gradient_checkpointing)
        choice.reasons.append(f"on battery at {battery['percent']:.0f}% (< {battery_low:g}%): smallest fitting rank")
    slower = [r for r in ranks if r not in in_time]
    choice.reasons.append(f"rank {choice.rank}: predicted round {predicted[choice.rank]:.1f} s for {steps} steps "
                          f"<= deadline {deadline_s:g} s (device {time_model.flops_per_s / 1e9:.1f} GFLOP/s, "
                          f"{time_model.overhead_s * 1e3:.1f} ms/step overhead)")
    if slower:
        choice.reasons.append(f"rank {min(slower)} would take {predicted[min(slower)]:.1f} s: past the deadline")
    return choice, predicted
