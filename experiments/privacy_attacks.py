"""The attacks on one trained victim: every (threat model, attacker, public-pool scale) row of
:mod:`experiments.inversion`, sharing the attacker's public pools (each built once).

Attackers::

    none   : the mean public image (no information)
    weak   : experiments.attack.fit_decoder, a fixed budget, on the 1x public pool;
             black-box encoder: experiments.attack.surrogate_client (task loss only);
             text (text-mode=quantized): experiments.attack.TextInverter (nearest centroid)
    converged: the strong white-box attacker under a longer stopping rule (``Budget.converged``),
             the check of how far the capped strong one is from its plateau
    strong : experiments.strong_attack.fit_strong_decoder (U-Net, until the PSNR on held-out
             public images stops improving) on the scale x aux_samples public pool;
             black-box encoder: the surrogate with FORA's feature alignment (MK-MMD² to the
             victim's captured features, experiments.mmd);
             text: experiments.text_attack.fit_text_decoder (until the held-out token accuracy stops)

The held-out public images are a separate seeded draw (:data:`VAL_SEED`) from the same public
pool, never the victim's. The text readers are white-box (the victim's client half encodes
the public prompts) for every threat, as the weak reader always was.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from experiments.attack import (
    TextInverter, encoded_prompts, fit_decoder, reconstruct, surrogate_client, unit_images, victim_client,
    wire_features,
)
from experiments.early_stopping import LearningCurve
from experiments.privacy_capture import Observation, TextRecovery, text_recovery
from experiments.strong_attack import fit_strong_decoder
from experiments.text_attack import fit_text_decoder
from sim.config import SplitConfig
from sim.data import CASE_STUDY_DATASETS
from sim.data.batches import TokenisedExamples, tokenise
from sim.data.tokenizer import get_tokenizer
from sim.training.reference import ReferenceResult

if TYPE_CHECKING:
    from experiments.inversion import Attack, Budget

AUX_SEED = 7_777  # seed of the attacker's public images (their pool is disjoint anyway)
VAL_SEED = AUX_SEED + 1  # the strong attacker's held-out public images: a separate draw from the public pool
SURROGATE_SEED_OFFSET = 1000  # a surrogate's seed is the victim's seed + this


def public_pool(cfg: SplitConfig, n: int, seed: int = AUX_SEED) -> TokenisedExamples:
    """The attacker's labelled public images, tokenised with the run's tokenizer."""
    examples = CASE_STUDY_DATASETS[cfg.dataset](n, seed, cfg.image_size, "public")
    return tokenise(examples, get_tokenizer(cfg))


@dataclass(frozen=True)
class ImageAttack:
    """One attack's reconstructions of the victim's images and how its decoder was fitted."""

    rec: torch.Tensor  # (n,3,H,W) in [0, 1]
    public_images: int  # public (image, features) pairs the decoder trained on
    curve: LearningCurve | None = None  # the strong attacker's
    decoder_steps: int | None = None


class VictimAttacks:
    """Runs the attacks of :class:`experiments.inversion.Attack` against one trained victim."""

    def __init__(self, cfg: SplitConfig, res: ReferenceResult, obs: Observation,
                 truth_text: tuple[list[np.ndarray], list[np.ndarray]], budget: Budget, seed: int) -> None:
        self.cfg, self.res, self.obs, self.truth_text, self.budget, self.seed = cfg, res, obs, truth_text, budget, seed
        self.server = res.server
        self.victim_model = victim_client(cfg, res.client_weights, self.server.vocab_size)
        self._pools: dict[int, TokenisedExamples] = {}
        self._texts: dict[tuple[str, int], TextRecovery] = {}

    def pool(self, scale: int) -> TokenisedExamples:
        """The public pool of ``scale`` x ``aux_samples`` images (built once)."""
        if scale not in self._pools:
            self._pools[scale] = public_pool(self.cfg, scale * self.budget.aux_samples)
        return self._pools[scale]

    @functools.cached_property
    def val(self) -> TokenisedExamples:
        return public_pool(self.cfg, self.budget.strong.val_samples, VAL_SEED)

    def _features(self, model, data: TokenisedExamples) -> torch.Tensor:
        return wire_features(model, self.server, data, self.cfg.batch_size)

    def images(self, a: Attack, n: int) -> ImageAttack:
        """The ``n`` victim images as attack ``a`` reconstructs them."""
        pool = self.pool(a.scale)
        images = unit_images(pool)
        if a.attacker == "none":
            return ImageAttack(images.mean(0, keepdim=True).expand(n, -1, -1, -1), len(pool))
        black = a.threat == "black-box"
        seed = self.seed + SURROGATE_SEED_OFFSET
        if a.attacker == "weak":
            enc = surrogate_client(self.cfg, self.server, pool, self.res.client_weights, self.budget.surrogate,
                                   seed=seed) if black else self.victim_model
            dec = fit_decoder(self._features(enc, pool), images, self.budget.decoder, seed=self.seed)
            return ImageAttack(reconstruct(dec, self.obs.features, own_statistics=black), len(pool),
                               decoder_steps=self.budget.decoder.steps)
        strong = self.budget.strong
        decoder = self.budget.converged if a.attacker == "converged" else strong.decoder
        if decoder is None:
            raise ValueError("this budget has no converged-attacker decoder (Budget.converged)")
        enc = surrogate_client(self.cfg, self.server, pool, self.res.client_weights, strong.surrogate, seed=seed,
                               align_to=self.obs.features, mmd_weight=strong.mmd_weight) if black else self.victim_model
        dec, curve = fit_strong_decoder(self._features(enc, pool), images, self._features(enc, self.val),
                                        unit_images(self.val), decoder, seed=self.seed)
        return ImageAttack(reconstruct(dec, self.obs.features, own_statistics=black), len(pool), curve,
                           curve.steps_run)

    def text(self, a: Attack) -> tuple[TextRecovery, LearningCurve | None]:
        """What attack ``a``'s attacker reads of the victim's prompts and answers; the curve of
        the learned reader the first time it is fitted (one per scale), else None."""
        if self.cfg.text_mode != "quantized":
            return text_recovery(self.obs, *self.truth_text), None
        kind = "strong" if a.attacker in ("strong", "converged") else "weak"
        slot = (kind, a.scale if kind == "strong" else 1)
        if slot in self._texts:
            return self._texts[slot], None
        curve = None
        if kind == "weak":
            reader = TextInverter(self.victim_model, self.server, self.pool(1), self.cfg.batch_size)
        else:
            vecs, ids = encoded_prompts(self.victim_model, self.server, self.pool(a.scale), self.cfg.batch_size)
            val_vecs, val_ids = encoded_prompts(self.victim_model, self.server, self.val, self.cfg.batch_size)
            dec, curve = fit_text_decoder(vecs, ids, val_vecs, val_ids, self.server.vocab_size, self.budget.strong.text,
                                          seed=self.seed)
            reader = dec.read
        self._texts[slot] = text_recovery(self.obs, *self.truth_text, read_prompt=reader)
        return self._texts[slot], curve
