"""``torch.linalg.svd`` and ``torch.svd_lowrank`` on CPU, and on CUDA when a GPU is present."""

from __future__ import annotations

from server.bench.backends.base import Backend, dense_exact_flops, dense_randomized_flops, register


class _Torch(Backend):
    family = "torch"
    requires = ("torch", "torch")
    routine = ""                   # the torch function, in the name: torch-<device>:<routine>

    def __init__(self, device: str):
        self.device = device
        self.name = f"torch-{device}:{self.routine}"

    def available(self):
        ok, reason = super().available()
        if ok and self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                return False, "no CUDA device visible to torch"
        return ok, reason

    def prepare(self, case, settings):
        import torch

        t = torch.from_numpy(case.matrix)
        return (t.to(self.device) if self.device != "cpu" else t), case.spec.rank

    def sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


class TorchSvd(_Torch):
    algorithm = "torch.linalg.svd(full_matrices=False) (gesdd on CPU), truncated to k"
    routine = "linalg.svd"

    def run(self, inputs, settings):
        import torch

        M, k = inputs
        U, S, Vt = torch.linalg.svd(M, full_matrices=False)
        return U[:, :k], S[:k], Vt[:k]

    def flops(self, case, settings, info):
        return dense_exact_flops(case)


class TorchLowrank(_Torch):
    algorithm = "torch.svd_lowrank(q=k+oversample, niter=power_iters), truncated to k"
    routine = "svd_lowrank"

    def run(self, inputs, settings):
        import torch

        M, k = inputs
        q = min(k + settings.oversample, min(M.shape))
        torch.manual_seed(settings.seed)
        U, S, V = torch.svd_lowrank(M, q=q, niter=settings.power_iters)
        return U[:, :k], S[:k], V[:, :k].mT

    def flops(self, case, settings, info):
        return dense_randomized_flops(case, settings)


for _dev in ("cpu", "cuda"):
    register(TorchSvd(_dev))
    register(TorchLowrank(_dev))
