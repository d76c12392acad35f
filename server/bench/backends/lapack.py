"""Dense LAPACK SVDs through NumPy and SciPy, and ARPACK through ``scipy.sparse.linalg.svds``."""

from __future__ import annotations

import numpy as np

from server.bench import flops as F
from server.bench.backends.base import Backend, dense_exact_flops, register


def _truncate(U, S, Vt, k):
    return U[:, :k], S[:k], Vt[:k]


class NumpyGesdd(Backend):
    name, family = "numpy:gesdd", "numpy"
    algorithm = "np.linalg.svd(full_matrices=False): LAPACK gesdd (divide and conquer), all values, truncated to k"

    def run(self, case, settings):
        return _truncate(*np.linalg.svd(case.matrix, full_matrices=False), case.spec.rank)

    def flops(self, case, settings, info):
        return dense_exact_flops(case)


class ScipyGesvd(Backend):
    name, family = "scipy:gesvd", "scipy"
    algorithm = "scipy.linalg.svd(lapack_driver='gesvd'): LAPACK QR iteration, truncated to k"
    requires = ("scipy.linalg", "scipy")

    def run(self, case, settings):
        import scipy.linalg

        out = scipy.linalg.svd(case.matrix, full_matrices=False, lapack_driver="gesvd",
                               check_finite=False, overwrite_a=False)
        return _truncate(*out, case.spec.rank)

    def flops(self, case, settings, info):
        return dense_exact_flops(case)


class ScipyGesddBackend(ScipyGesvd):
    name, family = "scipy:gesdd", "scipy"
    algorithm = "scipy.linalg.svd(lapack_driver='gesdd'), truncated to k"

    def run(self, case, settings):
        import scipy.linalg

        out = scipy.linalg.svd(case.matrix, full_matrices=False, lapack_driver="gesdd", check_finite=False)
        return _truncate(*out, case.spec.rank)


class ScipySvds(Backend):
    name, family = "scipy:svds", "scipy"
    algorithm = "scipy.sparse.linalg.svds(solver='arpack'): implicitly restarted Lanczos, k values"
    requires = ("scipy.sparse.linalg", "scipy")

    def applies(self, case):
        if case.spec.rank >= min(case.spec.d_out, case.spec.d_in):
            return False, "ARPACK needs k < min(d_out, d_in)"
        return True, ""

    def run(self, case, settings, operator=None):
        from scipy.sparse.linalg import svds

        A = case.matrix if operator is None else operator
        U, S, Vt = svds(A, k=case.spec.rank, solver="arpack", rng=np.random.default_rng(settings.seed))
        order = np.argsort(S)[::-1]
        return U[:, order], S[order], Vt[order]

    def count_products(self, case, settings) -> int:
        """Matrix-vector products ARPACK needs here (counted on a wrapped operator, untimed)."""
        from scipy.sparse.linalg import LinearOperator

        M = case.matrix
        count = [0]

        def mv(x):
            count[0] += 1 if x.ndim == 1 else x.shape[1]
            return M @ x

        def rmv(x):
            count[0] += 1 if x.ndim == 1 else x.shape[1]
            return M.T @ x

        op = LinearOperator(M.shape, matvec=mv, rmatvec=rmv, matmat=mv, rmatmat=rmv, dtype=M.dtype)
        self.run(case, settings, operator=op)
        return count[0]

    def flops(self, case, settings, info):
        products = info.get("arpack_products")
        return F.arpack(case.spec.d_out, case.spec.d_in, products) if products else None


for _b in (NumpyGesdd(), ScipyGesddBackend(), ScipyGesvd(), ScipySvds()):
    register(_b)
