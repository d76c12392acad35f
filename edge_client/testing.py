"""Tiny LLaMA models and tokenizers built in-process (no downloads), for tests and simulations."""
from __future__ import annotations

import random

__all__ = ["tiny_llama_config", "train_tokenizer", "synthetic_records", "tiny_model_and_tokenizer"]

_WORDS = ("red green blue cat dog bird one two three four five apple pear plum sun moon star "
          "river hill tree stone fire water wind north south east west big small fast slow").split()


def synthetic_records(n: int, *, seed: int = 0, task: str = "reverse") -> list[dict]:
    """Deterministic instruction data: reverse, sort or copy a few words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(_WORDS, rng.randint(2, 5))
        if task == "reverse":
            output = " ".join(reversed(words))
        elif task == "sort":
            output = " ".join(sorted(words))
        elif task == "copy":
            output = " ".join(words)
        else:
            raise ValueError(f"task must be reverse, sort or copy, got {task!r}")
        out.append({"instruction": f"{task.capitalize()} the words.", "input": " ".join(words),
                    "output": output, "category": task})
    return out


_TOKENIZER_CACHE: dict = {}


def train_tokenizer(texts=None, *, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained with `tokenizers` on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .data import format_prompt

    if texts is None and vocab_size in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE[vocab_size]
    default = texts is None
    if texts is None:
        texts = [format_prompt(r) + r["output"] for t in ("reverse", "sort", "copy")
                 for r in synthetic_records(200, seed=1, task=t)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if default:
        _TOKENIZER_CACHE[vocab_size] = out
    return out


def tiny_llama_config(*, vocab_size: int = 512, hidden: int = 64, layers: int = 2, heads: int = 4,
                      kv_heads: int | None = None, ffn: int | None = None, max_positions: int = 512, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn or hidden * 2 + hidden // 2,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads or heads, max_position_embeddings=max_positions,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **extra)


def tiny_model_and_tokenizer(*, seed: int = 0, **config_kwargs):
    """(model, tokenizer): a randomly initialised LLaMA-architecture causal LM and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer()
    config = tiny_llama_config(vocab_size=len(tokenizer), **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model, tokenizer
