"""Runtimes: thin adapters that say how clients are reached and where results go.

One run configuration (:mod:`.config`) and one assembly (:mod:`.build`, ``build_federation``)
serve them all; simulated clients live in :mod:`.clients`. ``simulate`` (``flexlora
simulate``, everything in one process), ``experiments`` (the comparison grid) and ``flower``
(ServerApp and simulated SuperNodes) never import each other.
"""
