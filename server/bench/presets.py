"""Presets: which cases, which backends, how many repeats.

* ``quick``: CI smoke test, well under a minute on 2 idle cores. llama-1.3b scaled by 1/8
  (a 256 x 256 dense matrix with a slow-decay spectrum; up_proj 688 x 256 LoRA sums of 8
  clients from the light and strong heavy-tail mixes, client ranks scaled by 1/8, k = 25).
* ``paper``: llama-1.3b's LoRA module shapes from workloads.json (q_proj 2048 x 2048, up_proj
  5504 x 2048, down_proj 2048 x 5504), 20 clients (the ``cpu_small`` scale) from the paper's
  rank mixes, target rank 200 (the largest client rank: what an r200 client gets back), and
  two dense spectra at 2048 x 2048. Several minutes on 2 cores.
* ``gpu``: CUDA backends only, llama-2-7b shapes, 80 clients (the paper's round size).

Every choice can be overridden from the command line (shapes, spectra, rank mixes, clients,
rank, backends, repeats).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.bench.cases import CaseSpec, client_ranks_for_mix, module_shapes

PRESETS = ("quick", "paper", "gpu")


@dataclass(kw_only=True, frozen=True)
class Preset:
    name: str
    model: str
    modules: tuple[str, ...]
    shape_scale: float
    rank_scale: float
    clients: int
    rank_mixes: tuple[str, ...]
    dense_shapes: tuple[str, ...]          # module names whose shape gets the dense spectra cases
    spectra: tuple[str, ...]
    rank: int | None                       # None: the largest client rank of the mix
    dense_rank: int
    backends: tuple[str, ...] | None
    device: str | None
    repeats: int
    min_repeats: int
    budget_s: float
    memory: str


PRESET_TABLE = {
    "quick": Preset(name="quick", model="llama-1.3b", modules=("up_proj",), shape_scale=0.125,
                    rank_scale=0.125, clients=8, rank_mixes=("heavy_tail_light", "heavy_tail_strong"),
                    dense_shapes=("q_proj",), spectra=("slow",), rank=None, dense_rank=25,
                    backends=None, device="cpu", repeats=5, min_repeats=3, budget_s=0.3, memory="inprocess"),
    "paper": Preset(name="paper", model="llama-1.3b", modules=("q_proj", "up_proj", "down_proj"), shape_scale=1.0,
                    rank_scale=1.0, clients=20, rank_mixes=("heavy_tail_light", "heavy_tail_strong"),
                    dense_shapes=("q_proj",), spectra=("fast", "slow"), rank=None, dense_rank=200,
                    backends=("ours:*", "numpy:*", "scipy:gesvd", "scipy:svds", "sklearn:*", "torch-cpu:*"),
                    device="cpu", repeats=5, min_repeats=3, budget_s=3.0, memory="subprocess"),
    "gpu": Preset(name="gpu", model="llama-2-7b", modules=("q_proj", "up_proj", "down_proj"), shape_scale=1.0,
                  rank_scale=1.0, clients=80, rank_mixes=("heavy_tail_light", "heavy_tail_strong"),
                  dense_shapes=("q_proj",), spectra=("fast", "slow"), rank=None, dense_rank=200,
                  backends=None, device="cuda", repeats=10, min_repeats=5, budget_s=5.0, memory="inprocess"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESET_TABLE:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    return PRESET_TABLE[name]


def parse_shape(text: str) -> tuple[int, int]:
    try:
        a, b = text.lower().split("x")
        m, n = int(a), int(b)
    except ValueError:
        raise ValueError(f"shapes: expected D_OUTxD_IN like 2048x5504, got {text!r}") from None
    if m < 1 or n < 1:
        raise ValueError(f"shapes: dimensions must be positive, got {text!r}")
    return m, n


def build_cases(workloads: dict, preset: Preset, *, shapes: list[tuple[int, int]] | None = None,
                spectra: list[str] | None = None, rank_mixes: list[str] | None = None,
                clients: int | None = None, rank: int | None = None, rank_scale: float | None = None,
                seed: int = 0) -> list[CaseSpec]:
    """The preset's cases, with any explicit option replacing the preset's choice."""
    spectra = list(preset.spectra if spectra is None else spectra)
    mixes = list(preset.rank_mixes if rank_mixes is None else rank_mixes)
    clients = preset.clients if clients is None else clients
    rank_scale = preset.rank_scale if rank_scale is None else rank_scale
    if shapes is None:
        table = module_shapes(workloads, preset.model)
        factored_shapes = [_scaled(table[m], preset.shape_scale) for m in preset.modules]
        dense_shapes = [_scaled(table[m], preset.shape_scale)[:2] for m in preset.dense_shapes]
    else:
        factored_shapes = [(m, n, "attn" if m == n else "ffn") for m, n in shapes]
        dense_shapes = list(shapes)
    cases: list[CaseSpec] = []
    for m, n in dense_shapes:
        k = min(rank or preset.dense_rank, m, n)
        cases.extend(CaseSpec(kind="dense", d_out=m, d_in=n, rank=k, spectrum=s, seed=seed) for s in spectra)
    for mix in mixes:
        for m, n, group in factored_shapes:
            ranks = client_ranks_for_mix(workloads, mix, clients, group, rank_scale)
            k = min(rank or preset.rank or max(ranks), m, n)
            cases.append(CaseSpec(kind="factored", d_out=m, d_in=n, rank=k, client_ranks=ranks,
                                  rank_mix=mix, alpha=float(workloads.get("lora_alpha", 16)), seed=seed))
    return cases


def _scaled(shape: tuple[int, int, str], scale: float) -> tuple[int, int, str]:
    m, n, group = shape
    return max(1, int(round(m * scale))), max(1, int(round(n * scale))), group
