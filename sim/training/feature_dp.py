"""(ε, δ) of the clipped ``feature-noise`` defence, from Flower's RDP accountant.

Mechanism (``feature-noise=σ``, ``feature-noise-clip=C > 0``; :mod:`sim.model.feature_noise`).
Each release of image ``x`` sends ``clip_C(f(x)) + σ·n``, with ``clip_C`` scaling the
flattened (N·D) features to L2 norm ≤ C and ``n ~ N(0, I)`` fresh for each release::

    release t of x:  f_t(x) -> clip to ||.|| <= C -> + N(0, σ² I) -> codec (post-processing) -> uplink

Neighbouring relation: replace-one, one image replaced by any other image. A release of
``x`` is a per-image query that depends on ``x`` alone (given the client weights), so its
L2 sensitivity is ``||clip_C(f(x)) - clip_C(f(x'))|| <= 2C``: the Gaussian mechanism with
noise multiplier ``z = σ / (2C)`` (Dwork & Roth, *The Algorithmic Foundations of
Differential Privacy*, Thm. A.1). There is no subsampling: every time the image is
actually sent counts (sampling rate 1), and ``k`` releases compose under Rényi DP
(Mironov, *Rényi Differential Privacy*, arXiv 1702.07476, Prop. 3 and 7), computed by
``flwr.supercore.privacy_accounting.RdpAccountant`` over Google's ``dp-accounting``.
Flower's accountant takes the unamplified Gaussian only with its add-or-remove label; for
an unsampled Gaussian that label does not enter the RDP (``α / (2 z²)``), the relation
enters through the sensitivity, which is replace-one's 2C here.

Threat model: an honest-but-curious server (or an eavesdropper) that sees every uplink
message. Covered: what the image stream of each training and evaluation message reveals
about one image, per image (the codes are post-processing of the noisy features). Not
covered: the text stream and the labels (sent as ids, or ``text-mode=quantized`` without
noise), the residual stream of ``residual-mode=transmit`` (sent without noise, so no ε is
reported), and the client weights and codec statistics sent back for FedAvg: they are
trained on the images and are not noised, so the bound is conditional on the client
weights (treated as known to the server) and is not an end-to-end guarantee of the run.
The ε assumes the server cannot regenerate the noise. With ``noise-secret`` set in every
SuperNode's node config (:mod:`sim.training.node`) the noise seed is keyed by a secret the
server never sees, so the assumption holds. Without it the noise is seeded from the run seed,
which the server holds, so it does not; nor in ``python -m sim run`` simulations, where Flower
sets the node config (docs/privacy.md).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from sim.config import SplitConfig, active_streams
from sim.data.batches import step_indices

from .client import _shard

NO_CLIP_REASON = "no clipping bound: unbounded sensitivity"
RESIDUAL_REASON = "residual-mode=transmit sends the residual stream without noise"


def noise_multiplier(sigma: float, clip: float) -> float:
    """``z = σ / (2C)``: the noise std over the replace-one L2 sensitivity 2C."""
    if sigma < 0 or clip <= 0:
        raise ValueError(f"need sigma >= 0 and clip > 0, got sigma={sigma}, clip={clip}")
    return sigma / (2.0 * clip)


def feature_epsilon(sigma: float, clip: float, releases: int, delta: float) -> float:
    """ε at ``delta`` of ``releases`` Gaussian releases of one image (clip ``C``, noise ``σ``):
    0 for no release, infinite without noise."""
    if releases < 0:
        raise ValueError(f"releases must be >= 0, got {releases}")
    z = noise_multiplier(sigma, clip)
    if releases == 0:
        return 0.0
    if z == 0:
        return math.inf
    config = PrivacyConfig(target_delta=delta, population_size=1, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=SamplingMethod.NO_AMPLIFICATION)
    accountant = RdpAccountant(config)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=1, population_size=1), count=releases)
    return accountant.get_epsilon(delta)


# ----------------------------------------------------------------------------- release counts
def train_release_counts(cfg: SplitConfig, num_train: int, partition: int) -> np.ndarray:
    """How many releases each of a partition's ``num_train`` training images gets over the run:
    the (round, step) micro-batches that hold it (``sim/data/batches.py`` ``step_indices``,
    as ``sim/training/client.py`` ``micro_batch`` draws them; a repeat within one
    micro-batch is the same release). Every round counts, as if the client were sampled."""
    counts = np.zeros(num_train, dtype=np.int64)
    for rnd in range(1, cfg.num_server_rounds + 1):
        for step in range(cfg.local_steps):
            counts[np.unique(step_indices(num_train, cfg.batch_size_at(rnd), cfg.seed, partition, rnd, step))] += 1
    return counts


def releases_per_train_image_max(cfg: SplitConfig, num_partitions: int) -> tuple[int, bool]:
    """The most releases of any training image over all partitions, and whether it is exact.

    Without the shards (``llava-json`` with each SuperNode's own file) the bound is one
    release per step: ``num-server-rounds · local-steps``."""
    if cfg.dataset == "llava-json" and not cfg.data_path:
        return cfg.num_server_rounds * cfg.local_steps, False
    most = 0
    for p in range(num_partitions):
        n = len(_shard(cfg, p, num_partitions)[0])
        if n:
            most = max(most, int(train_release_counts(cfg, n, p).max()))
    return most, True


def releases_per_test_image(cfg: SplitConfig) -> int:
    """Every round's evaluation sends each test image once (padding repeats share the release)."""
    return cfg.num_server_rounds


def feature_dp_summary(cfg: SplitConfig, num_partitions: int) -> dict:
    """summary.json's ``feature_dp`` entry: ε at ``feature-noise-delta`` for the most-released
    image, or ``epsilon: null`` with the reason; empty when ``feature-noise`` is off."""
    if cfg.feature_noise <= 0:
        return {}
    entry: dict = {"delta": cfg.feature_noise_delta, "sigma": cfg.feature_noise, "clip": cfg.feature_noise_clip}
    if cfg.feature_noise_clip <= 0:
        return {"feature_dp": {**entry, "epsilon": None, "reason": NO_CLIP_REASON}}
    if "residual" in active_streams(cfg):
        return {"feature_dp": {**entry, "epsilon": None, "reason": RESIDUAL_REASON}}
    train_max, exact = releases_per_train_image_max(cfg, num_partitions)
    test = releases_per_test_image(cfg)
    eps = feature_epsilon(cfg.feature_noise, cfg.feature_noise_clip, max(train_max, test), cfg.feature_noise_delta)
    return {"feature_dp": {
        **entry, "epsilon": eps, "releases_per_train_image_max": train_max, "releases_per_test_image": test,
        "releases_exact": exact, "noise_multiplier": noise_multiplier(cfg.feature_noise, cfg.feature_noise_clip),
    }}
