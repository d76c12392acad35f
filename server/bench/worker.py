"""One cold measurement of peak memory in a fresh process (``--memory subprocess``).

Reads a JSON job on stdin (``case_file``: the case as safetensors written by the parent,
``backend``: its name, ``settings``), loads the case, forms M if the backend needs it, then measures the resident memory one call adds
and prints ``{"peak_bytes": ..., "method": ...}`` as JSON. Nothing is pickled.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    job = json.loads(sys.stdin.read())
    from server.bench.backends import BenchSettings, load_all, select
    from server.bench.cases import load_case
    from server.bench.measure import PeakMemory, prepare_allocator

    prepare_allocator()
    settings = BenchSettings(**job["settings"])
    if settings.threads:
        try:
            import torch

            torch.set_num_threads(settings.threads)
        except ImportError:
            pass
    load_all()
    (backend,) = select([job["backend"]])
    case = load_case(job["case_file"])
    if backend.uses_formed_matrix(case) or case.spec.kind == "dense":
        case.matrix  # noqa: B018 - formed outside the measurement, as in the parent
    inputs = backend.prepare(case, settings)
    with PeakMemory() as peak:
        backend.run(inputs, settings)
        backend.sync()
    print(json.dumps({"peak_bytes": peak.peak_bytes, "method": peak.method}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
