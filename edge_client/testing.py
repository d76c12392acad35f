"""Tiny LLaMA models and tokenizers built in-process (no downloads), for tests and simulations."""
from __future__ import annotations

import random

__all__ = ["tiny_llama_config", "train_tokenizer", "synthetic_records", "tiny_model_and_tokenizer",
           "ARCHITECTURES", "tiny_config", "save_tiny_model"]

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


ARCHITECTURES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox")


def tiny_config(arch: str, *, vocab_size: int = 512, hidden: int = 32, layers: int = 2, heads: int = 4):
    """A tiny config of one of :data:`ARCHITECTURES` (hidden 32, 2 layers), pad/bos/eos = 0/1/2."""
    import transformers as tf

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ffn = hidden * 2 + hidden // 2
    if arch == "llama":
        return tiny_llama_config(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads)
    if arch in ("qwen2", "mistral"):
        cls = tf.Qwen2Config if arch == "qwen2" else tf.MistralConfig
        return cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=512,
                   tie_word_embeddings=arch == "qwen2", **ids)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                             **ids)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4,
                                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=512,
                                **ids)
    raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")


def save_tiny_model(arch: str, path, *, seed: int = 0, **config_kwargs) -> str:
    """Save a randomly initialised tiny ``arch`` model and the in-process tokenizer to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tokenizer), **config_kwargs))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)
