"""``flexlora bench svd``: a truncated-SVD kernel benchmark suite.

One module per concern: :mod:`cases` (inputs and spectra), :mod:`backends` (registry, one file
per library), :mod:`accuracy` (Eckart–Young scoring), :mod:`flops` (FLOP formulas),
:mod:`measure` (timing, peak memory), :mod:`machine` (machine info), :mod:`runner`,
:mod:`report` (table, JSON, CSV), :mod:`plots`, :mod:`presets`, :mod:`cli`. The whole-round
aggregation benchmark (``benchmarks/bench_aggregation.py``) adds :mod:`rounds` (the round, its
routes, FLOPs and err/opt) and :mod:`round_report` (its tables and acceptance lines).
"""

__all__ = ["cli"]
