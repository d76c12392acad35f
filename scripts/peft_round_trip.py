"""peft round trip: two peft-trained adapters (rank_pattern, alpha_pattern) in, the FlexLoRA
aggregate out as a peft folder, loaded by ``PeftModel.from_pretrained``; prints max |difference|
of (a) each adapter read through the wire vs peft's own delta, (b) the loaded aggregate's logits
vs the base with the aggregate's factors applied by hand, (c) the aggregate at full rank vs the
example-weighted average of the two peft deltas. ``python scripts/peft_round_trip.py [--arch gpt2]``
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def _peft_train(base, out, *, seed, rank_pattern, alpha_pattern, targets, fan_in_fan_out, steps=3):
    import copy

    from peft import LoraConfig, get_peft_model

    from edge_client.data import format_prompt
    from edge_client.testing import synthetic_records, train_tokenizer

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                     target_modules=list(targets), task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out)
    model = get_peft_model(copy.deepcopy(base), cfg)
    tok = train_tokenizer()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    recs = synthetic_records(8, seed=seed)
    for _ in range(steps):
        enc = tok([format_prompt(r) + r["output"] for r in recs], return_tensors="pt", padding=True)
        loss = model(**enc, labels=enc["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    deltas = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            dw = mod.get_delta_weight("default").detach().numpy()
            deltas[name] = dw.T if fan_in_fan_out else dw    # (d_out, d_in)
    return deltas


def round_trip(arch: str = "llama", rank: int = 32) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edge_client.peft_io import read_peft_adapter
    from edge_client.targets import discover_targets, has_conv1d
    from edge_client.testing import save_tiny_model

    tmp = Path(tempfile.mkdtemp())
    path = save_tiny_model(arch, tmp / "base")
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    targets = discover_targets(base)
    fan = has_conv1d(base)
    first, last = targets[0], targets[-1]
    deltas, updates = [], []
    for k, (n, rp, ap) in enumerate([(30, {last: 6}, {first: 32}), (10, {first: 2}, {last: 2.0})]):
        folder = tmp / f"adapter{k}"
        deltas.append(_peft_train(base, folder, seed=k, rank_pattern=rp, alpha_pattern=ap, targets=targets,
                                  fan_in_fan_out=fan))
        (folder / "flexlora.json").write_text(json.dumps({"num_examples": n, "client_id": f"c{k}"}))
        updates.append(read_peft_adapter(folder))
    wire_diff = max(float(np.abs(u.module_delta(m) - d[m]).max())
                    for u, d in zip(updates, deltas) for m in d)
    out = tmp / "global"
    import contextlib
    import io

    from server.cli import main as flexlora

    with contextlib.redirect_stdout(io.StringIO()):   # `flexlora aggregate A B --rank R --out DIR`
        if flexlora(["aggregate", str(tmp / "adapter0"), str(tmp / "adapter1"), "--rank", str(rank),
                     "--out", str(out), "--json"]) != 0:
            raise RuntimeError("flexlora aggregate failed")
    g = read_peft_adapter(out)
    ids = torch.tensor([[1, 5, 9, 14, 20, 33, 40, 2]])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path).eval(), str(out)).eval()
    by_hand = AutoModelForCausalLM.from_pretrained(path).eval()
    from edge_client.trainer import merge_deltas

    merge_deltas(by_hand, {m: g.module_delta(m) for m in g.modules()})
    with torch.no_grad():
        logit_diff = float((loaded(input_ids=ids).logits - by_hand(input_ids=ids).logits).abs().max())
    total = 40.0
    avg_diff = max(float(np.abs(g.module_delta(m)
                                - (30 / total) * deltas[0][m] - (10 / total) * deltas[1][m]).max())
                   for m in deltas[0])
    return {"arch": arch, "targets": list(targets), "rank": rank, "wire_vs_peft_delta": wire_diff,
            "loaded_vs_by_hand_logits": logit_diff, "aggregate_vs_weighted_average": avg_diff}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", action="append", default=None)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    for arch in args.arch or ["llama", "gpt2"]:
        print(json.dumps(round_trip(arch, args.rank)))
