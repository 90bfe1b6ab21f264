"""The ``nopeek-weight`` privacy defence: a distance-correlation penalty on what the client sends.

NoPeek (Vepakomma, Singh, Gupta & Raskar, "NoPeek: Information leakage reduction to share
activations in distributed deep learning", arXiv 2008.09161) trains the client half to
minimise ``task loss + lambda * DCOR(X, Z)`` between its raw inputs ``X`` and the
activations ``Z`` it shares. Here (inside :meth:`sim.model.ClientModel.encode`, only in the
recompute before the optimiser step)::

    pixels X (B,3,H,W) -> features y (B,N,D) -> compressor client half -> Encoded(aux_loss += lambda * dCor(X, y))

The sample distance correlation is Definition 4 of Székely, Rizzo & Bakirov, "Measuring
and testing dependence by correlation of distances" (Ann. Statist. 35(6), 2007,
arXiv 0803.4101). With ``a_kl = |X_k - X_l|`` (each sample flattened) and the
double-centred ``A_kl = a_kl - a_k. - a_.l + a_..`` (likewise ``B`` for ``Z``)::

    V²(X, Z) = mean_kl A_kl B_kl            (>= 0, their Theorem 1)
    dCor²(X, Z) = V²(X, Z) / sqrt(V²(X, X) V²(Z, Z))    (0 when the denominator is 0)

:func:`distance_correlation` returns the plain ``dCor`` (in [0, 1]), the quantity NoPeek
names ``DCOR``, or ``dCor²`` with ``squared=True``.
"""

from __future__ import annotations

import torch

DENOM_EPS = 1e-24  # floor of V²(X,X) V²(Z,Z) under the square root (a constant batch -> 0)


def safe_sqrt(t: torch.Tensor) -> torch.Tensor:
    """``sqrt(t)`` for ``t >= 0``; exactly 0, with a zero gradient, where ``t == 0`` (the inner
    ``where`` keeps the masked-out branch finite, so no NaN reaches the backward pass)."""
    pos = t > 0
    return torch.where(pos, torch.where(pos, t, torch.ones_like(t)).sqrt(), torch.zeros_like(t))


def centred_distances(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, B): the double-centred Euclidean distance matrix of the flattened samples.

    In float64, with the batch mean subtracted first (distances do not change), so that
    the Gram-matrix form of ``|x_k - x_l|²`` does not cancel catastrophically for close
    samples or features with a large offset (float32 is off by ~1e-5 in dCor). A zero
    distance (the diagonal, coincident samples) is exactly 0 (:func:`safe_sqrt`);
    ``sqrt(d² + eps)`` would put ``sqrt(eps)`` between coincident samples and give a
    constant batch a spurious nonzero dCor."""
    flat = x.reshape(x.shape[0], -1).double()
    flat = flat - flat.mean(dim=0, keepdim=True)
    sq = flat.pow(2).sum(dim=1)
    d = safe_sqrt((sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T).clamp_min(0.0))
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """The sample distance correlation of two batches (B, ...) and (B, ...): a differentiable
    float32 scalar in [0, 1]; 0 for B < 2 (see the module docstring)."""
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"batches of {x.shape[0]} and {z.shape[0]} samples")
    if x.shape[0] < 2:
        return z.new_zeros(()).float()
    a, b = centred_distances(x), centred_distances(z)
    vxz, vxx, vzz = (a * b).mean(), (a * a).mean(), (b * b).mean()
    r2 = (vxz / (vxx * vzz).clamp_min(DENOM_EPS).sqrt()).clamp(0.0, 1.0)
    return (r2 if squared else safe_sqrt(r2)).float()


def nopeek_loss(pixels: torch.Tensor, features: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * dCor(pixels, features)``, NoPeek's leakage term (``weight`` >= 0)."""
    if weight < 0:
        raise ValueError(f"nopeek-weight must be >= 0, got {weight}")
    return weight * distance_correlation(pixels, features)
