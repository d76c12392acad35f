"""`flexlora-client`: probe, plan, train, export. Expected failures print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"ranks must be comma-separated ints, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be ints >= 1, got {text!r}")
    return ranks


def _targets(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _load_config(name: str):
    """The model's config, through the same resolution as training (a registered name is
    converted once; a missing local path is one line)."""
    from .models import load_config

    return load_config(name)


def _common(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, default=None,
                   help="registered name (smollm2-135m), local model folder, .gguf file or hub id")
    p.add_argument("--ranks", type=_ranks, default=[4, 8, 16, 32, 64, 128, 200])
    p.add_argument("--paper-types", action="store_true", help="candidates r8, r30, r30_200, r200 instead of --ranks")
    p.add_argument("--targets", type=_targets, default=["auto"],
                   help="comma list of module short names; auto (default): every projection of the blocks")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the base weights (adapters stay float32)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds the round's local training may take: calibrate on this device (loads the "
                        "model, times a few steps) and keep only ranks predicted to finish in time")
    p.add_argument("--round-steps", type=int, default=30, help="optimizer steps of a round (with --deadline)")
    p.add_argument("--on-low-battery", choices=["ignore", "smaller", "skip"], default="smaller")
    p.add_argument("--battery-low", type=float, default=20.0, help="percent below which the battery is low")
    p.add_argument("--json", action="store_true")


def _gib(n) -> str:
    return f"{n / 2**30:8.2f}"


def cmd_probe(args) -> int:
    from .resources import probe

    profile = probe()
    out = {"profile": profile.to_dict()}
    if args.model:
        choice = _choose(args, profile)
        out["choice"] = choice.to_dict()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for key, value in profile.to_dict().items():
        print(f"{key:24s} {value}")
    if args.model:
        print(f"chosen rank: {choice.label} (rank {choice.rank}, pattern {choice.rank_pattern})")
        for reason in choice.reasons:
            print(f"  - {reason}")
    return 0


def _choose(args, profile):
    from .rank_policy import choose_rank, paper_candidates

    if args.deadline is not None:
        return _choose_for_deadline(args, profile)
    config = _load_config(args.model)
    return choose_rank(profile, config, None if args.paper_types else args.ranks,
                       candidates=paper_candidates() if args.paper_types else None, targets=args.targets,
                       batch=args.batch, seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
                       dtype=args.dtype)


def _choose_for_deadline(args, profile):
    from .timing import battery_state, calibrate, choose_rank_for_deadline
    from .trainer import LocalTrainer, TrainConfig

    if args.paper_types:
        raise ValueError("--deadline works with --ranks (uniform ranks), not --paper-types")
    trainer = LocalTrainer.from_pretrained(args.model, config=TrainConfig(target_modules=tuple(args.targets)),
                                           dtype=args.dtype)
    tm = calibrate(trainer, batch=args.batch, seq_lens=(max(8, args.seq_len // 4), args.seq_len))
    choice, _ = choose_rank_for_deadline(profile, trainer.base, args.ranks, time_model=tm, deadline_s=args.deadline,
                                         steps=args.round_steps, targets=trainer.config.target_modules,
                                         batch=args.batch, seq_len=args.seq_len, dtype=args.dtype,
                                         gradient_checkpointing=args.gradient_checkpointing,
                                         battery=battery_state(), battery_low=args.battery_low,
                                         on_low_battery=args.on_low_battery)
    return choice


def cmd_plan(args) -> int:
    from .memory import estimate
    from .rank_policy import RankCandidate, paper_candidates

    config = _load_config(args.model)
    cands = paper_candidates() if args.paper_types else [RankCandidate(rank=r) for r in args.ranks]
    rows = []
    for c in cands:
        e = estimate(config, args.targets, c.rank, c.pattern, batch=args.batch, seq_len=args.seq_len,
                     gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype)
        rows.append({"candidate": c.name, **e.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["base_weights", "lora_parameters", "gradients", "optimizer_states", "activations", "logits",
            "runtime_overhead", "heap_reuse", "total"]
    print(f"{'candidate':>12s} " + " ".join(f"{c[:10]:>10s}" for c in cols) + "   (GiB)")
    for row in rows:
        print(f"{row['candidate']:>12s} " + " ".join(f"{_gib(row[c]):>10s}" for c in cols))
    return 0


def _train_config(args, **over):
    from .trainer import TrainConfig

    return TrainConfig(**{"alpha": args.alpha, "rslora": args.rslora, "target_modules": tuple(args.targets),
                          "lr": args.lr, "batch_size": args.batch, "max_length": args.seq_len,
                          "epochs": args.epochs, "steps": args.steps,
                          "gradient_checkpointing": args.gradient_checkpointing, **over})


def cmd_train(args) -> int:
    from .trainer import LocalTrainer
    from .wire import RankSpec, decode_global, encode_update

    pattern = json.loads(args.rank_pattern) if args.rank_pattern else {}
    trainer = LocalTrainer.from_pretrained(args.model, config=_train_config(args),
                                           spec=RankSpec(rank=args.rank, rank_pattern=pattern),
                                           client_id=args.client_id, local_files_only=args.offline,
                                           dtype=args.dtype)
    trainer.check_spec(trainer.spec, strict_pattern=True, wire_dtype=args.wire_dtype)
    if args.global_factors:
        trainer.load_global(decode_global(Path(args.global_factors).read_bytes()))
    update = trainer.train(args.data, round=args.round, seed=args.seed)
    Path(args.out).write_bytes(encode_update(update, dtype=args.wire_dtype))
    summary = {"out": args.out, "num_examples": update.num_examples, "rank": update.rank,
               "rank_pattern": update.rank_pattern, **update.metrics}
    print(json.dumps(summary) if args.json else
          " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


def cmd_export(args) -> int:
    import numpy as np
    import torch

    from .export import OnnxLM, export_onnx, merged_model
    from .peft_io import read_update_path
    from .trainer import LocalTrainer, TrainConfig
    from .wire import RankSpec

    config, spec, update = None, None, None
    if args.adapter:   # a wire update file or a peft adapter folder
        update = read_update_path(args.adapter)
        config = TrainConfig(alpha=update.alpha, rslora=update.rslora, target_modules=tuple(update.target_modules))
        spec = RankSpec(rank=update.rank, rank_pattern=update.rank_pattern)
    trainer = LocalTrainer.from_pretrained(args.model, config=config, spec=spec, local_files_only=args.offline)
    if update is not None and _is_fingerprint(update.base_model) and update.base_model != trainer.base_model:
        raise ValueError(f"adapter {args.adapter} was trained on base model {update.base_model[:12]}..., "
                         f"not on {args.model} ({trainer.base_model[:12]}...): refusing to merge it")
    if args.kv_cache:
        return _export_kv(args, trainer, update)
    with trainer.adapter(factors=update.factors_at_alpha() if update is not None else None) as model:
        path = export_onnx(model, args.out)
        merged = merged_model(model)
    ids = np.array([[trainer.tokenizer.bos_token_id or 0] + list(range(3, 10))], dtype=np.int64)
    onnx_logits = OnnxLM(path).logits(ids)
    with torch.no_grad():
        ref = merged(input_ids=torch.from_numpy(ids)).logits.numpy()
    diff = float(np.abs(onnx_logits - ref).max())
    result = {"out": path, "max_abs_logit_diff": diff}
    if args.time_tokens:
        from .export import greedy_torch, time_per_token
        prompt = ids[0].tolist()
        lm = OnnxLM(path)
        ort_s, ort_spread = time_per_token(lm.greedy, prompt, args.time_tokens)
        torch_s, torch_spread = time_per_token(greedy_torch, merged, prompt, args.time_tokens)
        result.update(onnxruntime_ms_per_token=ort_s * 1e3, onnxruntime_spread_ms=ort_spread * 1e3,
                      torch_ms_per_token=torch_s * 1e3, torch_spread_ms=torch_spread * 1e3)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {path}; onnxruntime check: max |logits - torch| = {diff:.2e}")
        if args.time_tokens:
            print(f"greedy, {args.time_tokens} tokens, full sequence per step, median of 3 (spread): "
                  f"onnxruntime {result['onnxruntime_ms_per_token']:.2f} ms/token ({result['onnxruntime_spread_ms']:.2f})  "
                  f"torch {result['torch_ms_per_token']:.2f} ms/token ({result['torch_spread_ms']:.2f})")
    return 0 if diff < 1e-4 else 1


def _export_kv(args, trainer, update) -> int:
    """``export --kv-cache [--int8]``: the past-key-values graph, checked and optionally timed."""
    import os

    import numpy as np
    import torch

    from .export import merged_model
    from .export_kv import OnnxKVLM, export_onnx_kv, greedy_torch_cache, quantize_int8, timed

    with trainer.adapter(factors=update.factors_at_alpha() if update is not None else None) as model:
        path = export_onnx_kv(model, args.out)
        merged = merged_model(model)
    merged.config.use_cache = True
    ids = np.array([[trainer.tokenizer.bos_token_id or 0] + list(range(3, 10))], dtype=np.int64)
    with torch.no_grad():
        ref = merged(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    lm = OnnxKVLM(path)
    result = {"out": path, "max_abs_logit_diff": float(np.abs(lm.logits(ids) - ref).max()),
              "bytes": os.path.getsize(path)}
    q8 = None
    if args.int8:
        q8 = OnnxKVLM(quantize_int8(path, str(path).removesuffix(".onnx") + ".int8.onnx"))
        result.update(int8_out=str(path).removesuffix(".onnx") + ".int8.onnx",
                      int8_bytes=os.path.getsize(str(path).removesuffix(".onnx") + ".int8.onnx"),
                      int8_max_abs_logit_diff=float(np.abs(q8.logits(ids) - ref).max()))
    if args.time_tokens:
        prompt = ids[0].tolist()
        result["onnxruntime_kv_ms_per_token"] = timed(lm.greedy, prompt, args.time_tokens)[0] * 1e3
        if q8 is not None:
            result["onnxruntime_int8_ms_per_token"] = timed(q8.greedy, prompt, args.time_tokens)[0] * 1e3
        result["torch_generate_ms_per_token"] = timed(lambda p, n: greedy_torch_cache(merged, p, n), prompt,
                                                      args.time_tokens)[0] * 1e3
    print(json.dumps(result) if args.json else " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in result.items()))
    return 0 if result["max_abs_logit_diff"] < 1e-4 else 1


def _is_fingerprint(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def build_parser() -> argparse.ArgumentParser:
    from .trainer import TrainConfig

    TRAIN_DEFAULTS = TrainConfig()
    parser = argparse.ArgumentParser(prog="flexlora-client", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="device profile and the rank it affords")
    _common(p, model_required=False)
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("plan", help="memory breakdown per candidate rank")
    _common(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("train", help="one local round; writes an update file")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="JSONL with instruction, input, output")
    p.add_argument("--global-factors", default=None, help="global factors file from the server")
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rank-pattern", default=None, help='JSON, e.g. {"gate_proj": 200}')
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--targets", type=_targets, default=["auto"],
                   help="comma list of module short names; auto (default): every projection of the blocks")
    p.add_argument("--lr", type=float, default=TRAIN_DEFAULTS.lr)
    p.add_argument("--batch", type=int, default=TRAIN_DEFAULTS.batch_size)
    p.add_argument("--seq-len", type=int, default=TRAIN_DEFAULTS.max_length)
    p.add_argument("--epochs", type=int, default=TRAIN_DEFAULTS.epochs, help="passes over the data when --steps is 0")
    p.add_argument("--steps", "--max-steps", dest="steps", type=lambda x: int(x) or None,
                   default=TRAIN_DEFAULTS.steps, help="optimizer steps (default %(default)s; 0: use --epochs)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the round)")
    p.add_argument("--client-id", default="client")
    p.add_argument("--round", type=int, default=0)
    p.add_argument("--wire-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the base weights (adapters stay float32)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--offline", action="store_true", help="never contact the hub")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("export", help="merge the adapter and export ONNX, checked with onnxruntime")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None, help="an update file or a peft adapter folder to merge")
    p.add_argument("--out", required=True)
    p.add_argument("--time-tokens", type=int, default=0, help="also time greedy generation of N tokens")
    p.add_argument("--kv-cache", action="store_true", help="export the past-key-values form (incremental decoding)")
    p.add_argument("--int8", action="store_true", help="with --kv-cache: also write an int8 dynamic-quantised copy")
    p.add_argument("--offline", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"flexlora-client {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
