"""Feature-inversion attacker: a small conv decoder from decoded uplink features to pixels.

Learning-based model inversion in split learning (He, Zhang & Lee, "Model inversion
attacks against collaborative inference", ACSAC 2019: the "inverse network" attack):
the attacker fits a decoder ``g`` on auxiliary (image, features) pairs and applies it
to the victim's features::

    auxiliary images x_a (public pool, disjoint from every client's data)
      --encoder the attacker can run--> features f_a (the server codec's decoding, as on the wire)
      fit g: f_a -> x_a   (mean squared error)
    victim: captured uplink --server codec--> f_v --g--> x_hat_v,  scored against x_v (PSNR, SSIM)

The encoder the attacker runs depends on the threat model (``experiments/inversion.py``):
the victim's own client half (white-box: the FedAvg'd weights are public to the
federation), or a surrogate client half trained through the frozen server half on the
auxiliary data (black-box: the server half is known, the client half is not).

Decoder ``g`` ((B,N,D) -> (B,3,H,W)): the N tokens as a sqrt(N) x sqrt(N) grid with D
channels (standardised with the auxiliary set's per-channel mean and std), a 1x1 conv
to ``width`` channels, two residual 3x3 conv blocks, a 1x1 conv to ``3 p^2`` channels
and a pixel shuffle by the patch size p, then a small residual 3x3 conv refinement at
full resolution. About 0.16 M parameters at width 64 for 64-wide features. This fixed-budget
decoder is the study's "weak" attacker; the "strong" one (a U-Net trained until its
validation PSNR stops improving) is :mod:`experiments.strong_attack`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from experiments.mmd import mk_mmd2
from sim.config import SplitConfig
from sim.data.batches import TokenisedExamples, eval_text, pixels, train_text
from sim.model import ClientBatch, ClientModel, build_client_model, client_state, client_state_names, load_client_state
from sim.model.processor import image_processor
from sim.training.schedule import set_lr
from sim.training.server import ServerRuntime
from sim.training.split_step import answer_loss, first_answer_index, image_split, trainable


@dataclass(frozen=True)
class DecoderBudget:
    """Training budget of the inversion decoder (Adam, cosine decay to 5%)."""

    steps: int = 400
    batch: int = 64
    lr: float = 3e-3
    width: int = 64


@dataclass(frozen=True)
class SurrogateBudget:
    """Training budget of the black-box attacker's surrogate client half."""

    steps: int = 120
    batch: int = 32
    lr: float = 1e-3


class ResBlock(nn.Module):
    """``x + conv3x3(gelu(conv3x3(gelu(x))))``, same width and size."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(width, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(F.gelu(self.c1(F.gelu(x))))


class InversionDecoder(nn.Module):
    """(B,N,D) features -> (B,3,H,W) pixels in [0, 1] (unclamped while training)."""

    def __init__(self, dim: int, tokens: int, image_size: int, width: int = 64) -> None:
        super().__init__()
        grid = math.isqrt(tokens)
        if grid * grid != tokens or image_size % grid:
            raise ValueError(f"{tokens} tokens do not form a square grid dividing a {image_size}-pixel image")
        self.grid, self.patch = grid, image_size // grid
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))
        self.inp = nn.Conv2d(dim, width, 1)
        self.body = nn.Sequential(ResBlock(width), ResBlock(width))
        self.out = nn.Conv2d(width, 3 * self.patch**2, 1)
        self.refine = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 3, 3, padding=1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        B, N, D = f.shape
        x = ((f - self.mu) / self.sd).transpose(1, 2).reshape(B, D, self.grid, self.grid)
        img = F.pixel_shuffle(self.out(self.body(self.inp(x))), self.patch) + 0.5
        return img + self.refine(img)


def fit_decoder(feats: torch.Tensor, images: torch.Tensor, budget: DecoderBudget, seed: int) -> InversionDecoder:
    """Fit the decoder on auxiliary pairs: ``feats`` (M,N,D) float, ``images`` (M,3,H,W) in [0, 1]."""
    if len(feats) != len(images) or len(feats) < 2:
        raise ValueError(f"need matching auxiliary features and images, got {len(feats)} and {len(images)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = InversionDecoder(feats.shape[2], feats.shape[1], images.shape[-1], budget.width)
        flat = feats.reshape(-1, feats.shape[2])
        dec.mu.copy_(flat.mean(0))
        dec.sd.copy_(flat.std(0).clamp_min(1e-6))
        opt = torch.optim.Adam(dec.parameters(), lr=budget.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t / budget.steps))))
        gen = torch.Generator().manual_seed(seed)
        for _ in range(budget.steps):
            idx = torch.randint(len(feats), (min(budget.batch, len(feats)),), generator=gen)
            loss = F.mse_loss(dec(feats[idx]), images[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return dec.eval()


@torch.no_grad()
def reconstruct(dec: nn.Module, feats: torch.Tensor, batch: int = 256, own_statistics: bool = False) -> torch.Tensor:
    """(n,N,D) -> (n,3,H,W) reconstructions clamped to [0, 1] by a decoder with ``mu``/``sd``
    buffers (:class:`InversionDecoder`, :class:`experiments.strong_attack.UNetDecoder`).

    ``own_statistics``: standardise ``feats`` with their own per-channel mean and std
    instead of the auxiliary features' (the black-box attacker's calibration step: its
    surrogate's feature scale differs from the victim's, and it holds the victim's features)."""
    if own_statistics:
        flat = feats.reshape(-1, feats.shape[2])
        dec = _with_statistics(dec, flat.mean(0), flat.std(0).clamp_min(1e-6))
    return torch.cat([dec(feats[i:i + batch]) for i in range(0, len(feats), batch)]).clamp_(0.0, 1.0)


def _with_statistics(dec: nn.Module, mu: torch.Tensor, sd: torch.Tensor) -> nn.Module:
    out = copy.deepcopy(dec)
    out.mu.copy_(mu)
    out.sd.copy_(sd)
    return out


def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of (n,3,H,W) images in [0, 1] (scikit-image, data range 1)."""
    p = pred.permute(0, 2, 3, 1).double().numpy()
    t = target.permute(0, 2, 3, 1).double().numpy()
    psnr = np.array([peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(t, p)])
    ssim = np.array([structural_similarity(a, b, data_range=1.0, channel_axis=-1) for a, b in zip(t, p)])
    return psnr, ssim


def unit_images(data: TokenisedExamples, idx: np.ndarray | None = None) -> torch.Tensor:
    """uint8 images of a tokenised set as (n,3,H,W) floats in [0, 1]."""
    imgs = data.images if idx is None else data.images[torch.from_numpy(np.asarray(idx))]
    return imgs.float() / 255.0


# ----------------------------------------------------------------------------- encoders the attacker runs
@torch.no_grad()
def wire_features(model: ClientModel, server: ServerRuntime, data: TokenisedExamples, batch_size: int) -> torch.Tensor:
    """Features of every image of ``data`` as the server decodes them: the client half's image
    stream (and residual stream, if sent), packed and unpacked through the codecs, in
    micro-batches of ``batch_size`` as a client encodes them, so batch statistics match (a
    short last batch is padded by wrap-around). Same layout as ``privacy_capture.observe``.
    Pixels: the run's image processor (``server.cfg``'s vision tower)."""
    model.eval()
    processor = image_processor(server.cfg)
    n = len(data)
    idx = np.arange(-(-n // batch_size) * batch_size) % n
    out = []
    for start in range(0, len(idx), batch_size):
        pix = pixels(data, idx[start:start + batch_size], processor)
        enc = model(pix)  # image stream, with the run's feature noise
        ys = [server.model.codec.unpack(model.codec.pack(enc), tuple(enc.y.shape))]
        if model.residual_codec is not None:
            r = model.residual_codec(model.split_features(pix)[1])
            ys.append(server.model.residual_codec.unpack(model.residual_codec.pack(r), tuple(r.y.shape)))
        out.append(torch.cat(ys, dim=-1))
    model.train()
    return torch.cat(out)[:n].float()


@torch.no_grad()
def encoded_prompts(model: ClientModel, server: ServerRuntime, data: TokenisedExamples,
                    batch_size: int) -> tuple[list[torch.Tensor], list[np.ndarray]]:
    """The prompts of ``data`` as the server decodes the quantised text stream
    (``text-mode=quantized``): encoded by ``model`` exactly as a client encodes evaluation
    prompts (micro-batches of ``batch_size`` samples), packed, unpacked by the server's text
    codec half. Returns one (L_i, D) float tensor per sample and its L_i token ids."""
    if model.text_codec is None or server.model.text_codec is None:
        raise ValueError("reading the text stream needs a run with text-mode=quantized")
    prompts, _ = eval_text(data, np.arange(len(data)))
    processor = image_processor(server.cfg)
    vecs: list[torch.Tensor] = []
    for start in range(0, len(data), batch_size):
        idx = np.arange(start, min(start + batch_size, len(data)))
        chunk = prompts[start:start + batch_size]
        enc = model.encode(ClientBatch(pixels(data, idx, processor), chunk))["text"]
        flat = server.model.text_codec.unpack(model.text_codec.pack(enc), tuple(enc.y.shape))[0].float()
        vecs += list(torch.split(flat, [len(p) for p in chunk]))
    return vecs, [np.asarray(p) for p in prompts]


class TextInverter:
    """White-box inversion of the quantised text stream (``text-mode=quantized``), the weak
    text attacker: the attacker encodes its public prompts with the victim's client half
    (:func:`encoded_prompts`) and keeps the mean decoded vector of every token id. A victim's
    decoded prompt vector is read as the id of the nearest mean (nearest-centroid classifier;
    the learned, converged reader is :mod:`experiments.text_attack`)."""

    @torch.no_grad()
    def __init__(self, model: ClientModel, server: ServerRuntime, data: TokenisedExamples, batch_size: int) -> None:
        vecs, ids = encoded_prompts(model, server, data, batch_size)
        v, t = torch.cat(vecs), torch.from_numpy(np.concatenate(ids))
        self.ids = torch.unique(t)
        self.centroids = torch.stack([v[t == i].mean(0) for i in self.ids])

    def __call__(self, decoded: torch.Tensor) -> np.ndarray:
        """(L, D) decoded prompt vectors -> (L,) token ids."""
        return self.ids[torch.cdist(decoded.float(), self.centroids).argmin(1)].numpy()


def victim_client(cfg: SplitConfig, weights: dict[str, torch.Tensor], vocab_size: int) -> ClientModel:
    """White-box: the client half with the FedAvg'd weights every participant receives."""
    model = build_client_model(cfg, vocab_size)
    load_client_state(model, weights)
    return model


def shared_codec_state(model: ClientModel, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The part of the client state the server half shares: the codecs' round-synchronised
    buffers (AlignedVQ's codebook, which the server needs to decode), not the parameters."""
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: weights[n] for n in client_state_names(model) if n not in params}


def surrogate_client(
    cfg: SplitConfig, server: ServerRuntime, aux: TokenisedExamples, victim_weights: dict[str, torch.Tensor],
    budget: SurrogateBudget, seed: int, align_to: torch.Tensor | None = None, mmd_weight: float = 0.0,
) -> ClientModel:
    """Black-box: a client half of the same architecture from a fresh seed, trained on the
    auxiliary VQA data through the *frozen* server half with the task loss, so that its
    features mean to the server what the victim's mean. Of ``victim_weights`` it uses only
    :func:`shared_codec_state`.

    FORA-style feature alignment (Xu et al., "A Stealthy Wrongdoer: Feature-Oriented
    Reconstruction Attack against Split Learning", CVPR 2024, arXiv 2405.04115): with
    ``align_to`` (the victim's captured features y_hat, (n,N,D') with the image stream in the
    first D columns) and ``mmd_weight`` > 0, each step adds ``mmd_weight`` times the
    multi-kernel MMD² (:func:`experiments.mmd.mk_mmd2`, unbiased) between the surrogate's
    decoded image features of the batch and as many victim rows drawn at random. Without
    it the training is bitwise the plain surrogate's."""
    model = build_client_model(cfg.replace(seed=seed), server.vocab_size)
    known = shared_codec_state(model, victim_weights)
    if known:
        load_client_state(model, client_state(model) | known)
    params = trainable(model)
    opt = torch.optim.AdamW(params, lr=budget.lr)
    frozen = [p for p in server.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    server.model.eval()
    rng = np.random.default_rng(seed)
    processor = image_processor(cfg)
    align = align_to is not None and mmd_weight > 0
    if align and len(align_to) < 2:
        raise ValueError(f"feature alignment needs at least 2 victim feature rows, got {len(align_to)}")
    align_rng = np.random.default_rng([seed, 1])
    try:
        for t in range(budget.steps):
            idx = rng.choice(len(aux), size=min(budget.batch, len(aux)), replace=False)
            text = train_text(aux, idx, server.pad_id)
            enc = model(pixels(aux, idx, processor))
            split = image_split(cfg.image_position, first_answer_index(text))
            loss = answer_loss(server.model.logits(enc.y, text.ids, split), text, enc.y.shape[1]) + enc.aux_loss
            if align:
                pick = align_rng.choice(len(align_to), size=min(len(idx), len(align_to)), replace=False)
                loss = loss + mmd_weight * mk_mmd2(enc.y, align_to[torch.from_numpy(pick)][..., :enc.y.shape[-1]])
            set_lr(opt, budget.lr * 0.5 * (1 + math.cos(math.pi * t / budget.steps)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        server.model.train()
    return model

