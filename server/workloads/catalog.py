"""The workloads catalogue (``server/assets/workloads.json``): model shapes, LoRA client types,
rank distributions and client counts from the FlexLoRA paper and its public code. One file,
one loader, used by the runtimes (devices -> ranks), the experiments and the benchmarks."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["WORKLOADS", "ENV_VAR", "find_workloads", "load_workloads", "read_json"]

# Shipped inside the package, so installed copies find it.
WORKLOADS = Path(__file__).resolve().parents[1] / "assets" / "workloads.json"
ENV_VAR = "FLEXLORA_WORKLOADS"


def find_workloads(path: str | os.PathLike | None = None) -> Path:
    """``path`` if given, else ``$FLEXLORA_WORKLOADS`` if set, else the shipped copy. A path that
    is given (argument or variable) and is not a file is an error, never a silent fallback."""
    for given, what in ((path, "workloads file"), (os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")):
        if given is not None:
            if not Path(given).is_file():
                raise ValueError(f"{what} {str(given)!r} does not exist (or is not a file)")
            return Path(given)
    return WORKLOADS


def load_workloads(path: str | os.PathLike | None = None) -> dict:
    """The parsed catalogue (see :func:`find_workloads` for which file)."""
    where = find_workloads(path)
    doc = read_json(where, "workloads file")
    for key in ("models", "client_types", "rank_distributions"):
        if not isinstance(doc, dict) or key not in doc:
            raise ValueError(f"workloads file {str(where)!r} has no {key!r} section")
    return doc


def read_json(path: str | os.PathLike, what: str = "file"):
    """The parsed JSON document at ``path``; a malformed file is one ``ValueError`` naming it,
    the reason and the line."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
