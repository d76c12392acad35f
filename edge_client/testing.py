"""Tiny LLaMA models and tokenizers built in-process (no downloads), for tests and simulations."""
from __future__ import annotations

import random

__all__ = ["tiny_llama_config", "train_tokenizer", "synthetic_records", "tiny_model_and_tokenizer",
           "ARCHITECTURES", "tiny_config", "save_tiny_model", "write_tiny_gguf"]

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


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                      "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def _permute_heads(w, n_head: int):
    """llama.cpp's row order for q/k projections (``convert_hf_to_gguf.py`` ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, tokenizer, path, *, qtype: str = "F32", name: str = "tiny llama") -> str:
    """Write a LLaMA ``model`` and its byte-level BPE ``tokenizer`` as a GGUF file the way llama.cpp's
    converter does (tensor names, q/k head permutation, tokenizer metadata, chat template; tied
    embeddings: no ``output.weight``). ``qtype``: ``F32`` or ``Q8_0`` for the 2-D weights (norms
    stay F32). For tests of :mod:`edge_client.models`; needs the ``gguf`` package."""
    import json

    import gguf
    import numpy as np

    cfg = model.config
    if cfg.model_type != "llama":
        raise ValueError(f"write_tiny_gguf writes LLaMA models, got {cfg.model_type!r}")
    quant = {"F32": gguf.GGMLQuantizationType.F32, "Q8_0": gguf.GGMLQuantizationType.Q8_0}.get(qtype)
    if quant is None:
        raise ValueError(f"qtype must be F32 or Q8_0, got {qtype!r}")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_CHAT_TEMPLATE)

    def tensor(gguf_name: str, t, *, matrix: bool = True):
        arr = np.ascontiguousarray(t.detach().to("cpu").float().numpy())
        if matrix and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(gguf_name, arr)

    sd = model.state_dict()
    tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    tensor("output_norm.weight", sd["model.norm.weight"], matrix=False)
    if not cfg.tie_word_embeddings:
        tensor("output.weight", sd["lm_head.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        tensor(f"blk.{i}.attn_norm.weight", sd[pre + "input_layernorm.weight"], matrix=False)
        tensor(f"blk.{i}.ffn_norm.weight", sd[pre + "post_attention_layernorm.weight"], matrix=False)
        for hf, gg in names.items():
            weight = sd[pre + hf + ".weight"]
            if gg == "attn_q":
                weight = _permute_heads(weight, cfg.num_attention_heads)
            elif gg == "attn_k":
                weight = _permute_heads(weight, cfg.num_key_value_heads)
            tensor(f"blk.{i}.{gg}.weight", weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
