"""PCA and PCA-whitening of global descriptors, learned on train descriptors, applied inside the graph.

    mean, P = learn_pca_whitening(X_train, dim=256, power=0.5)   # numpy, float32
    whiten = Whiten.from_numpy(mean, P)                            # nn.Module: L2(P (x - mean))

`P` is `diag((lambda_i + shrink * lambda_1) ** -power) @ V[:, :dim].T` with the
eigen-pairs (lambda_i, V_i) of the covariance of X in decreasing order:
`power=0.5` is full whitening (Babenko & Lempitsky 2015, Jegou & Chum 2012),
`power=0` plain PCA rotation/reduction. The `Whiten` module is one `nn.Linear`
(weight `P`, bias `-P mean`) followed by L2 normalisation, so it exports to ONNX
as a single Gemm and can be fine-tuned (the learned whitening of
cnnimageretrieval-pytorch's "Lw" is the same layer initialised differently).
Learn it on TRAIN photos only; never on the photos a reported protocol queries.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _blas_limit():
    """One BLAS thread for the decompositions: on a busy 2-core box OpenBLAS's spinning threads made
    a 1280x1280 eigh 5x slower than a single thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only speed depends on it
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def pca(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [D], eigenvalues [r] decreasing, components [r, D]) of the rows of X, r = min(n-1, D).

    Eigen-decomposes the D x D covariance when n >= D, else the n x n Gram matrix of the
    centred rows (VLADs: n = 2,640 photos of 8,192 dims costs O(n^2 D), not O(D^3)).
    """
    X = np.asarray(X, dtype=np.float64 if X.shape[1] <= 4096 else np.float32)
    if X.ndim != 2 or len(X) < 2:
        raise ValueError(f"PCA needs a 2-D array of at least 2 rows, got shape {X.shape}")
    n, d = X.shape
    mean = X.mean(axis=0)
    Xc = X - mean
    r = min(n - 1, d)
    with _blas_limit():
        if n >= d:
            eig, vecs = np.linalg.eigh((Xc.T @ Xc).astype(np.float64) / n)
            order = np.argsort(eig)[::-1][:r]
            return mean.astype(np.float64), np.clip(eig[order], 0, None), vecs[:, order].T.astype(np.float64)
        lam, U = np.linalg.eigh((Xc @ Xc.T).astype(np.float64))  # Xc = U S V^T, Gram = U S^2 U^T
        order = np.argsort(lam)[::-1][:r]
        lam, U = np.clip(lam[order], 0, None), U[:, order]
        keep = lam > lam[0] * 1e-12 if lam[0] > 0 else np.zeros(len(lam), bool)
        lam, U = lam[keep], U[:, keep]
        comps = (Xc.T.astype(np.float64) @ U) / np.sqrt(lam)[None]  # V = Xc^T U S^-1
    return mean.astype(np.float64), lam / n, comps.T


def learn_pca_whitening(X: np.ndarray, dim: int | None = None, power: float = 0.5,
                        shrink: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Learn (mean [D], P [dim, D]) so that P (x - mean) is the PCA-whitened, reduced x.

    dim: output dimension (default: all components, at most min(n-1, D));
    power: eigenvalue exponent (0.5 whitening, 0 plain PCA, in between partial);
    shrink: added to every eigenvalue as a fraction of the largest one, so that
    near-zero directions are not blown up (1e-6 only guards against division by 0).
    """
    return whitening_from_pca(*pca(X), dim=dim, power=power, shrink=shrink)


def whitening_from_pca(mean: np.ndarray, eig: np.ndarray, comps: np.ndarray, dim: int | None = None,
                       power: float = 0.5, shrink: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(mean, P) from a `pca` result: lets one decomposition serve several (dim, power) choices."""
    r = len(eig)
    dim = r if dim is None else int(dim)
    if not 1 <= dim <= r:
        raise ValueError(f"whitening dim {dim} must be in 1..{r} (the rank of the {comps.shape[1]}-d training data)")
    lam = eig[:dim] + shrink * eig[0]
    P = (lam ** -power)[:, None] * comps[:dim]
    return mean.astype(np.float32), P.astype(np.float32)


class Whiten(nn.Module):
    """x -> L2(P (x - mean)): PCA(-whitening) as one Linear layer, learnable, ONNX-exportable."""

    def __init__(self, in_dim: int, out_dim: int, normalize: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=True)
        self.normalize = normalize
        self.power: float | None = None  # recorded by from_numpy, for meta records

    @classmethod
    def from_numpy(cls, mean: np.ndarray, P: np.ndarray, normalize: bool = True, power: float | None = None) -> Whiten:
        m = cls(P.shape[1], P.shape[0], normalize)
        with torch.no_grad():
            m.linear.weight.copy_(torch.from_numpy(np.asarray(P, np.float32)))
            m.linear.bias.copy_(torch.from_numpy(-(np.asarray(P, np.float64) @ np.asarray(mean, np.float64)).astype(np.float32)))
        m.power = power
        return m

    @classmethod
    def learn(cls, X: np.ndarray, dim: int | None = None, power: float = 0.5, normalize: bool = True) -> Whiten:
        mean, P = learn_pca_whitening(X, dim, power)
        return cls.from_numpy(mean, P, normalize, power)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return F.normalize(y, dim=-1) if self.normalize else y

    def params(self) -> dict:
        return {"in_dim": self.linear.in_features, "dim": self.linear.out_features, "power": self.power}
