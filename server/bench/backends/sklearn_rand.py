"""scikit-learn's randomized SVD (Halko et al.), with the shared oversampling/power settings."""

from __future__ import annotations

from server.bench.backends.base import Backend, dense_randomized_flops, register


class SklearnRandomized(Backend):
    name, family = "sklearn:randomized_svd", "sklearn"
    algorithm = "sklearn.utils.extmath.randomized_svd(n_oversamples, n_iter=power_iters, QR normaliser)"
    requires = ("sklearn.utils.extmath", "scikit-learn")

    def run(self, case, settings):
        from sklearn.utils.extmath import randomized_svd

        return randomized_svd(case.matrix, case.spec.rank, n_oversamples=settings.oversample,
                              n_iter=settings.power_iters, power_iteration_normalizer="QR",
                              random_state=settings.seed, flip_sign=False)

    def flops(self, case, settings, info):
        return dense_randomized_flops(case, settings)


register(SklearnRandomized())
