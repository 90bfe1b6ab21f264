"""The strong inversion attacker: a U-Net-like decoder on the token grid, trained to convergence.

Beside the fixed-budget decoder of :mod:`experiments.attack` (the "weak" attacker), this one
answers "has the attack converged?": it is larger, has skip connections, and trains until
its PSNR on held-out *public* images stops improving (:mod:`experiments.early_stopping`),
keeping the best weights. Same threat models and inputs (He, Zhang & Lee, "Model inversion
attacks against collaborative inference", ACSAC 2019: fit ``g: features -> image`` on
auxiliary pairs); the architecture follows U-Net (Ronneberger, Fischer & Brox, "U-Net:
Convolutional Networks for Biomedical Image Segmentation", arXiv 1505.04597)::

    (B,N,D) -> standardise -> grid (B,D,g,g), g = sqrt(N)
      stem 1x1 + res block                      s_0   (g x g, w channels)
      down: stride-2 conv + res block, x depth  s_1.. (g/2, 2w; g/4, 4w; ...)
      up:   x2 upsample, conv, concat s_k, res block     back to g x g
      pixel stages, one per prime factor f of the patch p: conv, pixel shuffle by f,
        concat the stem features s_0 (1x1-projected, nearest-upsampled: a skip from the
        token grid into every upsampling stage), conv, res block
      3x3 conv to RGB + 0.5                      (B,3,H,W), H = g·p

About 0.6 M parameters at width 64 for 64-wide features and patch 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from experiments.attack import ResBlock
from experiments.early_stopping import LearningCurve, StopRule, train_until_plateau


@dataclass(frozen=True)
class StrongDecoderBudget:
    """Adam at ``lr`` on batches of ``batch`` pairs until ``stop`` ends it."""

    stop: StopRule = field(default_factory=StopRule)
    batch: int = 64
    lr: float = 2e-3
    width: int = 64
    depth: int = 2  # down/up levels on the token grid (fewer if the grid is too small)


def _prime_factors(n: int) -> list[int]:
    out, f = [], 2
    while n > 1:
        while n % f == 0:
            out.append(f)
            n //= f
        f += 1
    return out


class UNetDecoder(nn.Module):
    """(B,N,D) features -> (B,3,H,W) pixels around [0, 1] (unclamped); ``mu``/``sd`` as
    :class:`experiments.attack.InversionDecoder`, so :func:`experiments.attack.reconstruct` takes it."""

    def __init__(self, dim: int, tokens: int, image_size: int, width: int = 64, depth: int = 2) -> None:
        super().__init__()
        grid = math.isqrt(tokens)
        if grid * grid != tokens or image_size % grid:
            raise ValueError(f"{tokens} tokens do not form a square grid dividing a {image_size}-pixel image")
        self.grid, self.patch = grid, image_size // grid
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))
        self.stem = nn.Sequential(nn.Conv2d(dim, width, 1), ResBlock(width))
        levels, g = 0, grid
        while levels < depth and g % 2 == 0 and g >= 4:
            levels, g = levels + 1, g // 2
        chans = [width * 2**k for k in range(levels + 1)]
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(chans[k], chans[k + 1], 3, stride=2, padding=1),
                                                ResBlock(chans[k + 1])) for k in range(levels))
        self.up = nn.ModuleList(nn.Conv2d(chans[k + 1], chans[k], 3, padding=1) for k in reversed(range(levels)))
        self.merge = nn.ModuleList(nn.Sequential(nn.Conv2d(2 * chans[k], chans[k], 3, padding=1), ResBlock(chans[k]))
                                   for k in reversed(range(levels)))
        skip = max(4, width // 4)
        self.skip = nn.Conv2d(width, skip, 1)
        self.factors = _prime_factors(self.patch)
        self.pixel_up, self.pixel_merge = nn.ModuleList(), nn.ModuleList()
        c = width
        for f in self.factors:
            nxt = max(min(16, width), c // 2)
            self.pixel_up.append(nn.Conv2d(c, nxt * f * f, 3, padding=1))
            self.pixel_merge.append(nn.Conv2d(nxt + skip, nxt, 3, padding=1))
            c = nxt
        self.head = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        B, _, D = f.shape
        x = ((f - self.mu) / self.sd).transpose(1, 2).reshape(B, D, self.grid, self.grid)
        s0 = self.stem(x)  # (B,w,g,g)
        skips, h = [s0], s0
        for down in self.down:
            h = down(h)
            skips.append(h)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            h = up(F.interpolate(h, scale_factor=2, mode="nearest"))
            h = merge(torch.cat([F.gelu(h), skips.pop()], dim=1))
        side, scale = self.skip(s0), 1
        for f_, up, merge in zip(self.factors, self.pixel_up, self.pixel_merge):
            scale *= f_
            h = F.pixel_shuffle(up(F.gelu(h)), f_)
            h = merge(torch.cat([F.gelu(h), F.interpolate(side, scale_factor=scale, mode="nearest")], dim=1))
        return self.head(F.gelu(h)) + 0.5


def mean_psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over images of the PSNR (dB, data range 1) of ``pred`` clamped to [0, 1]: what
    :func:`experiments.attack.image_metrics` computes, in torch."""
    mse = (pred.clamp(0.0, 1.0) - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((-10.0 * torch.log10(mse)).mean())


def fit_strong_decoder(feats: torch.Tensor, images: torch.Tensor, val_feats: torch.Tensor, val_images: torch.Tensor,
                       budget: StrongDecoderBudget, seed: int) -> tuple[UNetDecoder, LearningCurve]:
    """Fit on the public training pairs ``feats`` (M,N,D) / ``images`` (M,3,H,W) in [0, 1] until
    the PSNR on the held-out public pairs ``val_*`` stops improving; returns the decoder with
    the best validation weights and its learning curve (``val_score`` is the PSNR in dB)."""
    if len(feats) != len(images) or len(feats) < 2 or len(val_feats) != len(val_images) or not len(val_feats):
        raise ValueError(f"need matching training ({len(feats)}, {len(images)}) and validation "
                         f"({len(val_feats)}, {len(val_images)}) pairs")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = UNetDecoder(feats.shape[2], feats.shape[1], images.shape[-1], budget.width, budget.depth)
        flat = feats.reshape(-1, feats.shape[2])
        dec.mu.copy_(flat.mean(0))
        dec.sd.copy_(flat.std(0).clamp_min(1e-6))
        opt = torch.optim.Adam(dec.parameters(), lr=budget.lr)
        gen = torch.Generator().manual_seed(seed)

        def step() -> float:
            idx = torch.randint(len(feats), (min(budget.batch, len(feats)),), generator=gen)
            loss = F.mse_loss(dec(feats[idx]), images[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        def validate() -> float:
            rec = torch.cat([dec(val_feats[i:i + 256]) for i in range(0, len(val_feats), 256)])
            return mean_psnr(rec, val_images)

        curve = train_until_plateau(dec, opt, step, validate, budget.stop)
    return dec, curve
