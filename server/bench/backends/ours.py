"""Our native core through ``server.core.linalg``: the exact, randomized, dense and auto routes.

On a factored case the routes take the LoRA factors (``lowrank_svd``); ``dense`` forms dW
itself inside the timed call, so its time includes the formation. On a dense case ``exact``
and ``randomized`` run ``dense_svd`` on M; ``dense`` and ``auto`` need factors.
"""

from __future__ import annotations

import importlib

from server.bench import flops as F
from server.bench.backends.base import Backend, register

METHODS = ("exact", "randomized", "dense", "auto")


def _linalg():
    return importlib.import_module("server.core.linalg")


def planned_route(case) -> str | None:
    """The route ``auto`` takes for this case, from ``server.core.linalg.plan`` (None if unknown)."""
    try:
        p = _linalg().plan(case.spec.d_out, case.spec.d_in, list(case.spec.client_ranks), case.spec.rank)
    except Exception:  # noqa: BLE001 - reporting aid only
        return None
    for key in ("route", "method"):
        if isinstance(p, dict) and key in p:
            return str(p[key])
        if hasattr(p, key):
            return str(getattr(p, key))
    return None


class Ours(Backend):
    family = "ours"

    def __init__(self, method: str):
        self.method = method
        self.name = f"ours:{method}"
        self.inputs = "both" if method in ("exact", "randomized") else "factored"
        self.algorithm = {
            "exact": "server.core.linalg: factored QR + small SVD (dense case: dense_svd exact)",
            "randomized": "server.core.linalg: randomized range finder on the factored operator (dense case: dense_svd randomized)",
            "dense": "server.core.linalg: one fused GEMM forms dW, then its SVD (formation inside the timing)",
            "auto": "server.core.linalg: the route plan() picks from its cost model",
        }[method]

    def available(self):
        try:
            linalg = _linalg()
        except Exception as exc:  # noqa: BLE001 - any import failure means "not built"
            return False, f"server.core.linalg not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        missing = [n for n in ("lowrank_svd", "dense_svd") if not hasattr(linalg, n)]
        if missing:
            return False, f"server.core.linalg lacks {', '.join(missing)}"
        return True, ""

    def prepare(self, case, settings):
        linalg = _linalg()
        if settings.threads and hasattr(linalg, "set_num_threads"):
            linalg.set_num_threads(settings.threads)
        return case

    def run(self, case, settings):
        linalg = _linalg()
        s = case.spec
        if s.kind == "dense":
            method = "exact" if self.method == "exact" else "randomized"
            kwargs = {} if method == "exact" else {
                "oversample": settings.oversample, "power_iters": settings.power_iters, "seed": settings.seed}
            return linalg.dense_svd(case.matrix, s.rank, method=method, **kwargs)
        return linalg.lowrank_svd(case.Bs, case.As, [float(w) for w in case.weights], s.rank,
                                  method=self.method, oversample=settings.oversample,
                                  power_iters=settings.power_iters, seed=settings.seed)

    def _route(self, case) -> str:
        if case.spec.kind == "dense":
            return "exact" if self.method == "exact" else "randomized"
        if self.method == "auto":
            return planned_route(case) or "unknown"
        return self.method

    def flops(self, case, settings, info):
        s = case.spec
        route = self._route(case)
        if s.kind == "dense":
            if route == "exact":
                return F.svd_thin(s.d_out, s.d_in)
            return F.randomized_dense(s.d_out, s.d_in, s.rank, settings.oversample, settings.power_iters)
        R = s.total_rank
        if route == "exact":
            return F.exact_factored(s.d_out, s.d_in, R, s.rank)
        if route == "randomized":
            return F.randomized_factored(s.d_out, s.d_in, R, s.rank, settings.oversample, settings.power_iters)
        if route == "dense":
            return F.dense_route(s.d_out, s.d_in, R, s.rank, settings.oversample, settings.power_iters)
        return None

    def extra(self, case, settings):
        return {"route": self._route(case)} if self.method == "auto" and case.spec.kind == "factored" else {}

    def uses_formed_matrix(self, case):
        return False  # our routes start from the factors (ours:dense forms dW inside its own timing)


for _m in METHODS:
    register(Ours(_m))
