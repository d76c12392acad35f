"""ONNX export of the personalised model: merge the adapter, `torch.onnx.export(dynamo=True)` with dynamic
batch and sequence, run it with onnxruntime, greedy generation through onnxruntime (no KV cache)."""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["merged_model", "export_onnx", "OnnxLM", "greedy_torch", "time_per_token"]


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def merged_model(model):
    """A plain transformers model with the LoRA adapter merged into its weights (the input is untouched)."""
    from peft import PeftModel

    model = copy.deepcopy(model)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.config.use_cache = False
    return model.eval()


def export_onnx(model, path: str | os.PathLike, *, example_seq_len: int = 8, opset: int | None = None) -> str:
    """Export (merged) `model` to `path`; inputs input_ids and attention_mask (int64, [batch, seq]), output logits."""
    from torch.export import Dim

    model = merged_model(model)
    wrapper = _LogitsOnly(model).eval()
    ids = torch.ones(2, example_seq_len, dtype=torch.long)
    mask = torch.ones_like(ids)
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=model.config.max_position_embeddings)
    kwargs = {} if opset is None else {"opset_version": opset}
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (ids, mask), dynamo=True, input_names=["input_ids", "attention_mask"],
                                    output_names=["logits"], external_data=False,
                                    dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                    "attention_mask": {0: batch, 1: seq}}, **kwargs)
    program.save(str(path))
    return str(path)


class OnnxLM:
    """An onnxruntime session over an exported model: logits and greedy generation."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        return self.session.run(["logits"], {"input_ids": input_ids,
                                             "attention_mask": np.asarray(attention_mask, dtype=np.int64)})[0]

    def greedy(self, input_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        ids = list(input_ids)
        for _ in range(max_new_tokens):
            nxt = int(self.logits(np.array([ids]))[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos_token_id:
                break
        return ids[len(input_ids):]


@torch.no_grad()
def greedy_torch(model, input_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """The same loop in torch (full sequence each step, like `OnnxLM.greedy`), for comparison."""
    ids = list(input_ids)
    for _ in range(max_new_tokens):
        t = torch.tensor([ids])
        nxt = int(model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False).logits[0, -1].argmax())
        ids.append(nxt)
        if nxt == eos_token_id:
            break
    return ids[len(input_ids):]


def time_per_token(fn, *args, repeats: int = 3) -> tuple[float, float]:
    """(median, spread) seconds per generated token of `fn(*args)` returning the new tokens."""
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = len(fn(*args))
        times.append((time.perf_counter() - t) / max(n, 1))
    times.sort()
    return times[len(times) // 2], times[-1] - times[0]
