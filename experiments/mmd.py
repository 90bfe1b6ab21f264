"""Multi-kernel maximum mean discrepancy (MK-MMD), the distribution-matching loss of the
black-box attacker's surrogate client.

MMD (Gretton et al., "A Kernel Method for the Two-Sample Problem", arXiv 0805.2368) with
a kernel that is the equal-weight sum of Gaussian kernels at several bandwidths, the
multi-kernel form of Long et al., "Learning Transferable Features with Deep Adaptation
Networks" (arXiv 1502.02791). FORA (Xu et al., "A Stealthy Wrongdoer: Feature-Oriented
Reconstruction Attack against Split Learning", CVPR 2024, arXiv 2405.04115) aligns its
substitute client's features to the victim's smashed data with it.

The **unbiased** estimator (Gretton et al., the U-statistic MMD²_u) of samples x (m rows)
and y (n rows), each row one flattened sample::

    MMD²_u = 1/(m(m-1)) Σ_{i≠j} k(x_i, x_j) + 1/(n(n-1)) Σ_{i≠j} k(y_i, y_j) - 2/(mn) Σ_{i,j} k(x_i, y_j)
    k(a, b) = Σ_s exp(-‖a - b‖² / h_s)

It can be slightly negative. Bandwidths ``h_s``: given, or ``factor_s · median`` of the
squared distances between distinct rows of the pooled sample (the median heuristic,
computed without gradient), with factors :data:`BANDWIDTH_FACTORS`.
"""

from __future__ import annotations

import torch

BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m,F), (n,F) -> (m,n) squared Euclidean distances, clamped at 0."""
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None] - 2.0 * a @ b.T).clamp_min(0.0)


@torch.no_grad()
def median_bandwidths(x: torch.Tensor, y: torch.Tensor,
                      factors: tuple[float, ...] = BANDWIDTH_FACTORS) -> torch.Tensor:
    """``factor · median`` squared distance between distinct rows of the pooled (x, y)."""
    z = torch.cat([x.flatten(1), y.flatten(1)]).float()
    d = _sq_dists(z, z)
    off = d[~torch.eye(len(z), dtype=torch.bool, device=z.device)]
    med = off.median().clamp_min(1e-12)
    return med * torch.tensor(factors, dtype=z.dtype, device=z.device)


def mk_mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased MMD² between samples ``x`` (m, ...) and ``y`` (n, ...), m, n >= 2, with the
    multi-Gaussian kernel above (rows flattened); differentiable in both."""
    x, y = x.flatten(1).float(), y.flatten(1).float()
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples on each side, got {m} and {n}")
    h = median_bandwidths(x, y) if bandwidths is None else torch.as_tensor(bandwidths, dtype=x.dtype, device=x.device)

    def kernel(d: torch.Tensor) -> torch.Tensor:
        return torch.exp(-d[..., None] / h).sum(-1)

    kxx, kyy, kxy = kernel(_sq_dists(x, x)), kernel(_sq_dists(y, y)), kernel(_sq_dists(x, y))
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2.0 * kxy.mean()
