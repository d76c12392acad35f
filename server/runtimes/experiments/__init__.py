"""Paper-reproduction experiments: the FlexLoRA vs. baselines grid over rank distributions.

``flexlora experiment run`` runs strategies {FedIT at the smallest rank, FedIT at the largest
rank, HetLoRA, FLoRA, FlexLoRA} x the four rank distributions of ``server/assets/workloads.json``
x seeds on the bundled synthetic suite (or a converted real data set), resumably; ``report``
writes the markdown table, per-family breakdown, traffic, aggregation time, the spectrum
diagnostic and PNG plots; ``convert`` turns Natural Instructions task files or Dolly-15K
into the client JSONL format. See docs/experiments.md.
"""

from server.runtimes.experiments.config import ARMS, DISTRIBUTIONS, Arm, Cell, ExperimentConfig, experiment_settings

__all__ = ["ARMS", "DISTRIBUTIONS", "Arm", "Cell", "ExperimentConfig", "experiment_settings"]
