"""Official-convention check (issue 12): for random client factors at mixed ranks, the per-client
``B``, ``A`` that our FlexLoRA (default split) sends equal the official code's formulas
(alibaba/FederatedScope, branch FlexLoRA, ``fed_utils/adaptive_peft.py``: full SVD of the
aggregate, ``B = U_r diag(S_r) / (alpha / r)``, ``A = V_r^T``; restated here, not copied) up to
the sign of each singular pair, and the effective update ``s B A`` to ~1e-6.

    python scripts/official_convention_check.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from edge_client.wire import ClientUpdate
    from server.core.oracles import flexlora_delta
    from server.federation.strategies import FlexLoRA, RankSpec, StrategyConfig
    from server.federation.strategies.base import split_factors

    rng = np.random.default_rng(0)
    modules = {"m.q_proj": (64, 64), "m.up_proj": (128, 64)}
    ranks, alphas, ns = (2, 4, 8, 16), (16.0, 16.0, 32.0, 16.0), (5, 20, 11, 7)
    updates = []
    for i, (r, al, n) in enumerate(zip(ranks, alphas, ns)):
        f = {}
        for m, (d_out, d_in) in modules.items():
            f[m + ".lora_A.weight"] = rng.standard_normal((r, d_in)).astype(np.float32) * 0.1
            f[m + ".lora_B.weight"] = rng.standard_normal((d_out, r)).astype(np.float32) * 0.1
        updates.append(ClientUpdate(client_id=f"c{i}", factors=f, num_examples=n, rank=r, alpha=al,
                                    base_model="f" * 32, target_modules=["q_proj", "up_proj"]))
    st = FlexLoRA(StrategyConfig(alpha=16.0), max_rank=32, method="exact")
    st.aggregate(updates, round=1)
    print("| module | client rank | max abs(A - A_off) | max abs(B - B_off) / max abs(B_off) | "
          "max abs(sBA - sBA_off) / max abs(dW_r) |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for m in modules:
        clients = []
        for u in updates:
            b, a = split_factors(u.factors)[m]
            clients.append((b, a, u.module_scaling(m), u.num_examples))
        dw = flexlora_delta(clients)
        U, S, Vt = np.linalg.svd(dw, full_matrices=True)
        for r in ranks:
            msg = st.configure(client_id="x", spec=RankSpec(rank=r), round=2)
            b, a = (msg.factors[m + k].astype(np.float64) for k in (".lora_B.weight", ".lora_A.weight"))
            s = 16.0 / r
            b_off, a_off = U[:, :r] * S[:r] / s, Vt[:r]
            sign = np.sign(np.sum(a * a_off, axis=1))
            ea = np.abs(a * sign[:, None] - a_off).max()
            eb = np.abs(b * sign[None, :] - b_off).max() / np.abs(b_off).max()
            ref = s * b_off @ a_off
            ew = np.abs(s * b @ a - ref).max() / np.abs(ref).max()
            worst = max(worst, ew)
            print(f"| {m} | {r} | {ea:.1e} | {eb:.1e} | {ew:.1e} |")
    print(f"\nworst relative error of the effective update: {worst:.1e}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
