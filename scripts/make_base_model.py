#!/usr/bin/env python
"""Make the tiny LLaMA-architecture base model shipped in ``server/assets/tiny-llama``.

How it was made (``python scripts/make_base_model.py``, seed 0, 2 CPU cores):
1. A generic corpus is derived from the synthetic suite's vocabulary (``server.workloads.tasks``):
   plain sentences about the words, countries/capitals, word polarities and numbers, plus
   instruction-format examples of two *generic* tasks that are not suite families (copy the
   input; name the last word). The base model thus knows the words, the facts and the prompt
   format, but none of the ten suite tasks, so federated LoRA fine-tuning has something to teach.
2. A BPE tokenizer (``tokenizers``, Metaspace pre-tokenizer, 320 tokens) is trained on it in-process.
3. ``LlamaConfig(hidden_size=96, intermediate_size=264, num_hidden_layers=3,
   num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=True)`` (370k
   parameters) is trained from scratch with AdamW (one-cycle lr 3e-3, batch 32, sequences up
   to 96 tokens) for 1500 steps; final training loss about 0.7.
4. The weights are saved as safetensors (float32, 1.5 MB) with the config and tokenizer.
The shipped copy was made with ``--threads 1`` and took 250 s of wall time on the 2-core
development machine while other jobs loaded it heavily (printed at the end); expect about
a minute on an idle machine.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_client.data import format_prompt  # noqa: E402
from server.workloads.tasks import CAPITALS, POLARITY, WORDS  # noqa: E402

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def generic_corpus(rng: random.Random, n: int) -> list[str]:
    """Plain text and two generic instruction tasks over the suite's vocabulary."""
    vocab = list(WORDS) + list(CAPITALS) + list(CAPITALS.values()) + list(POLARITY)
    lines = []
    for _ in range(n):
        kind = rng.randrange(7)
        if kind == 0:
            c = rng.choice(sorted(CAPITALS))
            lines.append(f"the capital of {c} is {CAPITALS[c]}.")
        elif kind == 1:
            w = rng.choice(sorted(POLARITY))
            lines.append(f"the word {w} is {POLARITY[w]}.")
        elif kind == 2:
            lines.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(3, 8))) + ".")
        elif kind == 3:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            lines.append(f"{NUMBER_WORDS[a]} is {a} and {NUMBER_WORDS[b]} is {b}.")
        elif kind == 4:
            w = rng.choice(WORDS)
            lines.append(f"{w} has {len(w)} letters and starts with {w[0]}. {w.upper()} {w}.")
        elif kind == 5:
            words = rng.sample(vocab, rng.randint(2, 5))
            lines.append(format_prompt({"instruction": "Copy the input.", "input": " ".join(words)}) + " ".join(words))
        else:
            words = rng.sample(vocab, rng.randint(2, 5))
            lines.append(format_prompt({"instruction": "Name the last word.", "input": " ".join(words)}) + words[-1])
    return lines


def train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "server" / "assets" / "tiny-llama")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    args = ap.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    corpus = generic_corpus(rng, 12000)
    tok = train_tokenizer(corpus, vocab_size=320)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    texts = [tok.bos_token + line + tok.eos_token for line in corpus]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    model.train()
    for step in range(args.steps):
        batch = tok(rng.sample(texts, 32), return_tensors="pt", padding=True, truncation=True,
                    max_length=96, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {n} parameters to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
