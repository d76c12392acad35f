"""What a federation trains on, shared by every runtime: the base model (:mod:`.model`), the
instruction suites (:mod:`.suite`, :mod:`.tasks`, :mod:`.rank_suite`, the real-content suite
:mod:`.real_suite` over :mod:`.real_tasks`, real data via :mod:`.convert`), the workloads
catalogue and the devices -> ranks map (:mod:`.devices`), and evaluation (:mod:`.evaluate`).

Imports ``edge_client`` and ``server.core``; never the federation or a runtime.
"""
