"""The closing summary of a ``flexlora simulate --json`` document, then Rouge-L per held-out task
after every round and, where the run kept them, the first answers per task (reference -> answer).

    flexlora simulate ... --json > run.json && python scripts/simulate_summary.py run.json
"""

from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    from server.runtimes.simulate import results_summary

    with open(args[0], encoding="utf-8") as fh:
        doc = json.load(fh)
    print(results_summary(doc))
    rows = [doc["base"], *doc["rounds"]]
    if not all(r.get("families") for r in rows):
        return 0
    kept = bool(doc["base"].get("samples"))
    print("per round, Rouge-L per held-out task" + (" and its first answers (reference -> answer)" if kept else ""))
    for r in rows:
        print(f"  {r.get('round', 'base')}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["families"].items()))
        for task, pairs in (r.get("samples") or {}).items():
            print(f"      {task}: " + " | ".join(f"{ref!r} -> {ans!r}" for ref, ans in pairs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
