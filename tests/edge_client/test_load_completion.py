"""Every slot of every LoRA module learns after loading server factors (issue 12): slots beyond
the sent rank, and sent slots with no direction, get the orthonormal completion of A."""
import numpy as np
import torch

from edge_client.data import tokenize_record
from edge_client.testing import synthetic_records
from edge_client.trainer import LocalTrainer, TrainConfig
from edge_client.wire import GlobalFactors, RankSpec
from server.core.adapter import GlobalAdapter


def test_every_slot_has_gradient_after_loading_low_rank_factors(tiny_model, tokenizer):
    cfg = TrainConfig(batch_size=4, steps=1, max_length=64, target_modules=("q_proj", "v_proj"))
    tr = LocalTrainer(tiny_model, tokenizer, config=cfg, spec=RankSpec(rank=6))
    with tr.adapter(RankSpec(rank=6), seed=0) as model:
        names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    rng = np.random.default_rng(0)
    modules = {}
    for n in names:
        module = n.split(".lora_A")[0]
        d_in = dict(tiny_model.named_parameters())[module.replace("base_model.model.", "") + ".weight"].shape
        d_out, d_in = d_in
        # a rank-2 global update: a rank-6 client receives 2 directions, 4 empty slots
        u, _ = np.linalg.qr(rng.standard_normal((d_out, 6)))
        v, _ = np.linalg.qr(rng.standard_normal((d_in, 6)))
        modules[module] = (u.astype(np.float32), np.array([0.5, 0.2, 0, 0, 0, 0], np.float32),
                           v.T.astype(np.float32))
    g = GlobalAdapter(modules=modules, max_rank=6)
    for sent in (2, 6):       # the server sends rank 2 (loader completes) or rank 6 (server completes)
        factors = g.client_factors(sent, alpha=cfg.alpha)
        msg = GlobalFactors(factors=factors, rank=sent, alpha=cfg.alpha, round=1, strategy="flexlora")
        records = synthetic_records(4, seed=1)
        with tr.adapter(RankSpec(rank=6), seed=0, factors=msg) as model:
            ids, mask, labels = tr._collate([tokenize_record(tokenizer, r, cfg.max_length) for r in records])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            params = dict(model.named_parameters())
            for n in names:
                a, b = params[n], params[n.replace("lora_A", "lora_B")]
                assert a.shape[0] == 6
                per_slot = a.grad.abs().sum(dim=1) + b.grad.abs().sum(dim=0)
                assert torch.all(per_slot > 0), (sent, n, per_slot)
                rows = a.detach().numpy()[2:]
                np.testing.assert_allclose(rows @ rows.T, np.eye(4), atol=1e-5)
                np.testing.assert_allclose(b.detach().numpy()[:, 2:], 0)
