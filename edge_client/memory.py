"""Peak-memory model of one LoRA training step, from a transformers config, without weights.

The model is built on torch's ``meta`` device (shapes only, no memory), wrapped by peft at the
requested rank, and one forward pass runs under ``saved_tensors_hooks`` to record every tensor
autograd keeps for the backward pass. That gives the activation memory of the very code that
will train (attention implementation, peft's LoRA layers, the loss), for any architecture
transformers knows. The rest is arithmetic:

  peak = base weights + LoRA parameters + logits working set + runtime overhead
         + max(retention x saved activations, saved activations + gradients + optimizer states)

Gradients and optimizer states are float32, like peft's adapters. The logits working set is the
loss's transient peak in the backward pass (upcast logits, log-softmax output and their
gradients, each batch x seq x vocab float32). The runtime overhead is the resident size of
Python with torch, transformers and peft loaded. Saved activations are scaled by
`ACTIVATION_RETENTION` (the allocator keeps freed temporaries resident; `ACTIVATION_RETENTION_16BIT`
with bfloat16/float16 base weights). The defaults were measured
on x86-64 Linux with the CPU build of torch and can be overridden.

Why a max and not a sum: the first step's backward pass leaves ``retention x saved`` bytes resident
in the allocator's heap, and only then does the optimizer create its states (AdamW allocates them
lazily in its first ``step``) and later steps their gradients, out of that freed heap. From the
second step on a step needs the saved activations again beside the gradients and the optimizer
states. So gradients and optimizer states add to the peak only where they exceed the heap the
activations left behind (:attr:`MemoryEstimate.heap_reuse` is the part that does not add). Summing
everything over-predicted SmolLM2-135M at sequence 256 by up to 29% (rank 192; issue 20); the max
keeps the 12 SmolLM2 and 16 LLaMA-h512 measurements of ``bench_memory_model.py`` within 20%.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = ["MemoryEstimate", "estimate", "DTYPE_BYTES", "RUNTIME_BASE_BYTES", "ACTIVATION_RETENTION",
           "ACTIVATION_RETENTION_16BIT"]

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1}
# Resident size of a Python process after `import torch, transformers, peft` (CPU torch 2.x).
RUNTIME_BASE_BYTES = 420 * 2**20
# Resident activation memory per byte autograd saves. The forward pass's unsaved temporaries and the
# backward pass's activation gradients are freed into the C allocator's heap, which keeps them mapped, so
# the resident peak is about twice the saved bytes (measured by benchmarks/bench_memory_model.py on
# glibc x86-64, CPU torch 2.x, LLaMA shapes; within a few percent over 18 configurations).
ACTIVATION_RETENTION = 2.0
# With 16-bit base weights the forward's freed temporaries are 16-bit too, while part of what autograd saves
# stays float32 (peft upcasts a LoRA layer's input to the adapter's dtype): the resident peak is about 1.25x
# the saved bytes (bench_memory_model.py, LLaMA h512 l8, bfloat16, ranks 8/64 x seq 64/256: fitted 1.04-1.40).
ACTIVATION_RETENTION_16BIT = 1.25


@dataclass(kw_only=True)
class MemoryEstimate:
    """Predicted peak bytes of one training step, with its breakdown."""
    base_weights: int
    lora_parameters: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    runtime_overhead: int
    heap_reuse: int          # gradients + optimizer states placed in heap the activations left resident
    lora_parameter_count: int
    batch: int
    seq_len: int
    dtype: str
    optimizer: str
    gradient_checkpointing: bool

    @property
    def total(self) -> int:
        return (self.base_weights + self.lora_parameters + self.gradients + self.optimizer_states
                + self.activations + self.logits + self.runtime_overhead - self.heap_reuse)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["total"] = self.total
        return out


def _meta_peft_model(model_config, targets, rank, rank_pattern, dtype, alpha):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from .targets import has_conv1d, resolve_targets

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=getattr(torch, dtype))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(resolve_targets(model, targets)),
                        rank_pattern=dict(rank_pattern or {}), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", fan_in_fan_out=has_conv1d(model))
    return get_peft_model(model, config)


def _trace_saved(model, batch: int, seq_len: int, vocab: int):
    """Bytes autograd saves in one forward pass on meta tensors: (activations, vocab-sized)."""
    import torch

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}
    keep = []

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params and key not in seen:
            keep.append(storage)  # keep it alive so its address is not reused during the trace
            seen[key] = (storage.nbytes(), t.dim() >= 1 and t.shape[-1] == vocab)
        return t

    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    # transformers probes position ids for packed sequences with a data-dependent check that meta
    # tensors cannot answer; our batches are padded, never packed.
    try:
        from transformers import masking_utils
        original = getattr(masking_utils, "find_packed_sequence_indices", None)
    except ImportError:
        masking_utils, original = None, None
    if original is not None:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    # transformers checks a batch without attention mask for pad tokens (a data-dependent test that
    # meta tensors cannot answer, e.g. GPT-2 with pad_token_id set); the trace's batch has no padding.
    config = model.get_base_model().config
    pad_token_id, config.pad_token_id = config.pad_token_id, None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False)
    finally:
        config.pad_token_id = pad_token_id
        if original is not None:
            masking_utils.find_packed_sequence_indices = original
    act = sum(n for n, is_vocab in seen.values() if not is_vocab)
    vocab_bytes = sum(n for n, is_vocab in seen.values() if is_vocab)
    return act, vocab_bytes


def estimate(model_config, targets: Sequence[str], rank: int | None = None,
             rank_pattern: Mapping[str, int] | None = None, *, batch: int, seq_len: int,
             dtype: str = "float32", optimizer: str = "adamw", gradient_checkpointing: bool = False,
             alpha: float = 16.0, runtime_base_bytes: int = RUNTIME_BASE_BYTES,
             activation_retention: float | None = None) -> MemoryEstimate:
    """Predict the peak memory of one training step.

    `model_config` is a transformers `PretrainedConfig` (or a dict for `LlamaConfig`); `rank` is
    the default LoRA rank and `rank_pattern` peft-style overrides (e.g. ``{"gate_proj": 200}``).
    """
    if rank is None and not rank_pattern:
        raise ValueError("give rank or rank_pattern")
    rank = int(rank if rank is not None else max(rank_pattern.values()))
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    if not targets:
        raise ValueError("targets must name at least one module, e.g. ['q_proj', 'v_proj']")
    if isinstance(model_config, Mapping):
        from transformers import LlamaConfig
        model_config = LlamaConfig(**model_config)

    model = _meta_peft_model(model_config, targets, rank, rank_pattern, dtype, alpha)
    base = lora_count = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            lora_count += p.numel()
        else:
            base += p.numel() * p.element_size()
    lora_bytes = lora_count * 4  # peft keeps adapters in float32
    vocab = int(model_config.vocab_size)
    act, vocab_saved = _trace_saved(model, batch, seq_len, vocab)
    if gradient_checkpointing:
        layers = max(1, int(getattr(model_config, "num_hidden_layers", 1)))
        hidden = int(model_config.hidden_size)
        boundary = layers * batch * seq_len * hidden * DTYPE_BYTES[dtype]
        act = boundary + 2 * (act // layers)  # layer inputs kept; one layer recomputed, plus its gradients
    # The returned logits stay alive through backward, where the loss adds the gradients of the
    # log-softmax output and input (each batch x seq x vocab float32).
    logits = vocab_saved + 3 * batch * seq_len * vocab * 4
    # Backward through a layer holds gradients about the size of that layer's saved activations.
    layers = max(1, int(getattr(model_config, "num_hidden_layers", 1)))
    act += act // layers if not gradient_checkpointing else 0
    grads = lora_bytes
    opt = OPTIMIZER_STATES[optimizer] * lora_bytes
    if activation_retention is None:
        activation_retention = ACTIVATION_RETENTION if dtype == "float32" else ACTIVATION_RETENTION_16BIT
    saved = int(act)
    act = int(act * activation_retention)
    # gradients and optimizer states fill the heap the first backward left resident (module docstring)
    reuse = max(0, min(grads + opt, act - saved))
    overhead = int(runtime_base_bytes)
    return MemoryEstimate(base_weights=int(base), lora_parameters=lora_bytes, gradients=grads,
                          optimizer_states=opt, activations=int(act), logits=int(logits),
                          runtime_overhead=overhead, heap_reuse=int(reuse), lora_parameter_count=int(lora_count),
                          batch=batch, seq_len=seq_len, dtype=dtype, optimizer=optimizer,
                          gradient_checkpointing=bool(gradient_checkpointing))


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
