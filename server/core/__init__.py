"""The FlexLoRA math, in one room: the native core's facade (:mod:`.linalg`, over
``server._core``), input validation (:mod:`.validate`), the streaming aggregators
(:mod:`.aggregation`, GPU twin :mod:`.cuda_aggregation` over :mod:`.cuda`), the global adapter
and its redistribution at each client's rank (:mod:`.adapter`), offline aggregation of
collected adapters (:mod:`.offline`), and the reference algorithm with the NumPy oracles that
tests and benchmarks compare against (:mod:`.oracles`).

Imports only ``edge_client.wire`` (and ``edge_client.completion``) and itself; torch only in the
CUDA modules and the oracles, on first use.
"""
