"""ONNX export with a KV cache (the past-key-values form Optimum and onnxruntime-genai use) and
incremental greedy decoding through onnxruntime, plus int8 dynamic quantisation.

Graph inputs: ``input_ids`` [batch, new], ``attention_mask`` [batch, past + new], and for every
layer ``past_key_values.<i>.key`` / ``.value`` [batch, kv_heads, past, head_dim]; outputs
``logits`` [batch, new, vocab] and ``present.<i>.key`` / ``.value`` [batch, kv_heads, past + new,
head_dim]. The prompt runs once with an empty past (length 0), then one token per step.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["export_onnx_kv", "OnnxKVLM", "quantize_int8", "greedy_torch_cache"]


def _cache_dims(config):
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return layers, kv_heads, head_dim


class _WithCache(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = _cache_dims(model.config)[0]

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        past_len = past[0].shape[2]
        position_ids = (torch.arange(input_ids.shape[1], dtype=torch.long) + past_len).unsqueeze(0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        presents = []
        for i in range(self.layers):
            layer = out.past_key_values.layers[i]
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def export_onnx_kv(model, path: str | os.PathLike, *, opset: int = 17) -> str:
    """Export the (merged) model with past-key-values inputs and present outputs to ``path``."""
    from .export import merged_model

    model = merged_model(model)
    model.config.use_cache = True
    layers, kv_heads, head_dim = _cache_dims(model.config)
    wrapper = _WithCache(model).eval()
    ids = torch.ones(1, 3, dtype=torch.long)
    past = [torch.zeros(1, kv_heads, 2, head_dim) for _ in range(2 * layers)]
    mask = torch.ones(1, 5, dtype=torch.long)
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    dynamic = {"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"}}
    dynamic.update({n: {0: "batch", 2: "past"} for n in past_names})
    dynamic.update({n: {0: "batch", 2: "total"} for n in present_names})
    dynamic["logits"] = {0: "batch", 1: "new"}
    with torch.no_grad():
        torch.onnx.export(wrapper, (ids, mask, *past), str(path), dynamo=False, opset_version=opset,
                          input_names=["input_ids", "attention_mask", *past_names],
                          output_names=["logits", *present_names], dynamic_axes=dynamic)
    return str(path)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """int8 dynamic quantisation of the weights (onnxruntime.quantization.quantize_dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return str(dst)


class OnnxKVLM:
    """onnxruntime session over :func:`export_onnx_kv`'s graph: prefill once, then one token a step."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past_inputs}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray], total: int):
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((ids.shape[0], total), np.int64), **past}
        outs = self.session.run(self.output_names, feeds)
        new_past = {name.replace("present.", "past_key_values."): arr
                    for name, arr in zip(self.output_names[1:], outs[1:])}
        return outs[0], new_past

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, np.int64)
        return self.step(ids, self._empty_past(ids.shape[0]), ids.shape[1])[0]

    def greedy(self, input_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        ids = np.array([list(input_ids)], np.int64)
        logits, past = self.step(ids, self._empty_past(1), ids.shape[1])
        total, out = ids.shape[1], []
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos_token_id or len(out) == max_new_tokens:
                break
            total += 1
            logits, past = self.step(np.array([[nxt]], np.int64), past, total)
        return out


@torch.no_grad()
def greedy_torch_cache(model, input_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None
                       ) -> list[int]:
    """torch ``generate`` with its KV cache, greedy (the honest baseline)."""
    ids = torch.tensor([list(input_ids)])
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if eos_token_id is None else 0,
                         eos_token_id=eos_token_id, pad_token_id=model.config.pad_token_id or 0)
    return gen[0, ids.shape[1]:].tolist()


def timed(fn, *args, repeats: int = 3) -> tuple[float, float, int]:
    """(median, spread) seconds per new token and the tokens produced."""
    fn(*args)
    times, n = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = len(fn(*args))
        times.append((time.perf_counter() - t) / max(n, 1))
    times.sort()
    return times[len(times) // 2], times[-1] - times[0], n
