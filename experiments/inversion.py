"""Feature-inversion privacy study: ``python -m experiments.inversion [--quick] [--out DIR]``.

What can the server (or an eavesdropper on the uplink) reconstruct from what crosses
the wire, and how much does each compressor help? For every victim configuration
(case-study dataset x compressor x bits x ``feature-noise`` sigma x seed)::

    1. train the split model with sim.training.reference.run_reference (2 clients, the same step
       functions as the Flower app)                                  -> task accuracy
    2. capture the victim's (partition 0) evaluate.split_infer reply: the codes of its
       held-out images, as the bytes Flower transports, with its ledger row
       (experiments/privacy_capture.py)                               -> what the attacker holds
    3. decode them with the server half (parse_eval_reply)            -> features y_hat
    4. for each threat model, fit a decoder y_hat -> image on the public pool of the
       dataset (disjoint from every client's data, sim/data/casestudy.py "Pools") and
       reconstruct the victim's images                                -> PSNR, SSIM

Threat models (the attacker is the server or an eavesdropper; it always knows the
architecture, the run config, the server half, and holds public same-domain images):

* ``white-box``: also knows the FedAvg'd client-half weights. In SplitFed the server
  computes them and every participant receives them each round, so this is the
  realistic case for an honest-but-curious server or a curious fellow client that
  taps the uplink. The attacker encodes its public images with the victim's client
  half (same codec, same noise seed) and trains the decoder on exactly the feature
  distribution the victim sends.
* ``black-box``: does not know the client-half weights (e.g. an eavesdropper, or a
  deployment whose aggregation runs elsewhere). It trains a surrogate client half
  on its labelled public images through the frozen server half (so the surrogate's
  features mean what the server expects), fits the decoder on surrogate features
  and applies it to the victim's. It is given the codecs' synchronised buffers
  (AlignedVQ's codebook), which the server half needs to decode anyway.
* ``mean-image``: the no-information baseline, the mean public image for every victim image.

Attackers (the ``attacker`` column; :mod:`experiments.privacy_attacks`): every white-box and
black-box row is run by the ``weak`` attacker (a fixed-budget conv decoder, the study's
original one) and by the ``strong`` one (a U-Net trained until its PSNR on held-out public
images stops improving, with a FORA-style MMD-aligned surrogate for black-box,
:mod:`experiments.strong_attack`), the latter also on 2x and 4x the public pool
(``public_scale``, ``--public-scale``) for the victims that sweep it. With
``text-mode=quantized`` each attacker also reads the question tokens back from the text
stream (nearest centroid, or a learned decoder: :mod:`experiments.text_attack`).

Rows go to ``privacy.csv`` (one per victim x threat x attacker x public scale, appended as
they finish; a rerun skips the rows already there, :mod:`experiments.privacy_rows`), the
strong attacker's learning curves to ``privacy_curves.csv`` and example reconstructions to
``--examples``; the report (privacy.md, plots, the grid of examples) is built from those
files by :mod:`experiments.privacy_report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from experiments.attack import DecoderBudget, SurrogateBudget, image_metrics, unit_images
from experiments.common import FINETUNE_BUDGET, FINETUNE_QUICK, REGIMES, SCRATCH, method_overrides, setup_logging
from experiments.early_stopping import LearningCurve, StopRule
from experiments.privacy_attacks import AUX_SEED, VAL_SEED, VictimAttacks
from experiments.privacy_capture import capture_eval_uplink, observe
from experiments.privacy_rows import CURVE_COLUMNS, append_rows, done_keys, set_aside_stale
from experiments.strong_attack import StrongDecoderBudget
from experiments.text_attack import TextDecoderBudget
from sim.compress import get_codec
from sim.config import SplitConfig
from sim.data.batches import eval_text, pixels
from sim.model.processor import image_processor
from sim.training.client import client_runtime
from sim.training.feature_dp import feature_dp_summary
from sim.training.reference import run_reference

log = logging.getLogger("experiments.inversion")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
CLIENTS = 2
VICTIM = 0  # partition whose held-out images are attacked
EXAMPLES_PER_RUN = 8
THREATS = ("white-box", "black-box", "mean-image")
VQ_SPLIT = get_codec("vq").sweep["split-point"]  # AlignedVQ's split point: after LayerNorm 1 of vision block 0


@dataclass(frozen=True)
class StrongBudget:
    """The strong attacker: the U-Net decoder trained to a plateau, the FORA-aligned surrogate
    (task loss + ``mmd_weight`` x MK-MMD² to the victim's features), the learned text reader,
    and the held-out public images they stop on."""

    decoder: StrongDecoderBudget
    surrogate: SurrogateBudget
    mmd_weight: float
    text: TextDecoderBudget
    val_samples: int


@dataclass(frozen=True)
class Budget:
    """Everything that sizes a study: the training run, the public pool, the attackers.

    ``regime``: ``finetune`` (the headline: split fine-tuning of the shipped checkpoint, the
    default job's recipe, :data:`experiments.common.FINETUNE_BUDGET`, with ``train`` on top)
    or ``scratch`` (random initialisation, the earlier study: ``SCRATCH`` + ``train``).
    ``public_scales``: the strong attacker's public training pools, as multiples of
    ``aux_samples``, for the victims with ``scale_sweep`` (1x always; every other victim and
    the weak attacker get 1x only)."""

    train: dict[str, object]
    aux_samples: int
    decoder: DecoderBudget
    surrogate: SurrogateBudget
    strong: StrongBudget
    public_scales: tuple[int, ...] = (1,)
    regime: str = "finetune"
    converged: StrongDecoderBudget | None = None  # the "converged" attacker's decoder: the strong one, longer

    def base(self) -> dict[str, object]:
        """The run config every victim of this budget starts from (before its method and defence)."""
        if self.regime not in REGIMES:
            raise ValueError(f"unknown regime {self.regime!r}; valid: {', '.join(REGIMES)}")
        start = SCRATCH if self.regime == "scratch" else {k: v for k, v in FINETUNE_BUDGET.items() if k != "dataset"}
        return {**start, **self.train}


# The earlier study (--regime scratch): a tiny model (width 64, 2 ViT + 2 LLM layers, 32 px,
# 64 image tokens) trained from random weights for 6 rounds x 20 micro-batches of 16 per
# client (2 clients: 120 server steps of 32), 1 600 samples (720 training and 80 held-out
# images per client).
FULL_SCRATCH = Budget(
    train={
        "num-server-rounds": 6, "local-steps": 20, "steps-per-exchange": 20, "batch-size": 16,
        "warmup-steps": 10, "num-samples": 1600, "test-fraction": 0.1, "hidden-size": 64,
        "image-size": 32, "patch-size": 4,
    },
    aux_samples=1600,
    decoder=DecoderBudget(steps=300, batch=64, lr=3e-3, width=64),
    surrogate=SurrogateBudget(steps=60, batch=32, lr=1e-3),
    strong=StrongBudget(
        decoder=StrongDecoderBudget(stop=StopRule(max_steps=5000, eval_every=50, patience=5, min_delta=0.02,
                                                  lr_drops=1, lr_factor=0.2), batch=64, lr=2e-3, width=32, depth=2),
        surrogate=SurrogateBudget(steps=240, batch=32, lr=1e-3), mmd_weight=1.0, text=TextDecoderBudget(),
        val_samples=200),
    public_scales=(1, 2, 4),
    regime="scratch",
)
# --quick: the same pipeline on a toy budget (CI smoke test); its numbers mean nothing.
QUICK_SCRATCH = Budget(
    train={
        "num-server-rounds": 1, "local-steps": 4, "steps-per-exchange": 2, "batch-size": 8,
        "warmup-steps": 1, "num-samples": 160, "test-fraction": 0.2, "hidden-size": 32,
        "image-size": 16, "patch-size": 4,
    },
    aux_samples=96,
    decoder=DecoderBudget(steps=20, batch=32, lr=3e-3, width=16),
    surrogate=SurrogateBudget(steps=4, batch=8, lr=1e-3),
    strong=StrongBudget(
        decoder=StrongDecoderBudget(stop=StopRule(max_steps=12, eval_every=4, patience=1, lr_drops=1), batch=16,
                                    lr=2e-3, width=8, depth=1),
        surrogate=SurrogateBudget(steps=4, batch=8, lr=1e-3), mmd_weight=1.0,
        text=TextDecoderBudget(stop=StopRule(max_steps=12, eval_every=4, patience=1, min_delta=0.001, lr_drops=0),
                               batch=16, hidden=16),
        val_samples=24),
    public_scales=(1, 2),
    regime="scratch",
)
# The headline study (--regime finetune): every victim fine-tunes the shipped checkpoint
# (checkpoints/tiny-vlm: width 128, 32 px, 64 image tokens) as the default job does, 8 rounds
# (1 alignment + 7 fine-tuning) x 60 micro-batches of 8 per client, 6 000 samples (2 700
# training and 300 held-out images per client), with the earlier study's attackers; the strong
# decoder takes batches of 32 and at most 1 500 steps (0.16 s a step at batch 64 on one core
# with the checkpoint's 128-wide features: the earlier cap of 5 000 would take 13 min an attack).
# At that cap it is still improving, so the seed-0 acceptance victims are also attacked by the
# "converged" attacker: the same decoder under the earlier study's stopping rule (5 000 steps).
FULL = dataclasses.replace(
    FULL_SCRATCH, train={"checkpoint": False}, regime="finetune",
    strong=dataclasses.replace(FULL_SCRATCH.strong, decoder=StrongDecoderBudget(
        stop=StopRule(max_steps=1500, eval_every=50, patience=4, min_delta=0.02, lr_drops=1, lr_factor=0.2),
        batch=32, lr=2e-3, width=32, depth=2)),
    converged=dataclasses.replace(FULL_SCRATCH.strong.decoder, batch=32))
QUICK = dataclasses.replace(QUICK_SCRATCH, train={k: v for k, v in FINETUNE_QUICK.items()
                                                  if k not in FINETUNE_BUDGET or FINETUNE_BUDGET[k] != v},
                            regime="finetune", converged=dataclasses.replace(
                                QUICK_SCRATCH.strong.decoder, stop=StopRule(max_steps=24, eval_every=4, patience=2)))
BUDGETS = {("finetune", False): FULL, ("finetune", True): QUICK, ("scratch", False): FULL_SCRATCH,
           ("scratch", True): QUICK_SCRATCH}


@dataclass(frozen=True)
class Attack:
    """One result row's attack: a threat model, the attacker that runs it (``weak``: the
    fixed-budget decoder; ``strong``: the U-Net trained to a plateau; ``none``: the mean-image
    baseline) and the size of its public training pool (x ``Budget.aux_samples``)."""

    threat: str
    attacker: str
    scale: int = 1


@dataclass(frozen=True)
class Victim:
    """One victim configuration and the threat models to run against it; ``scale_sweep``: the
    strong white-box attacker also runs on the larger public pools of ``Budget.public_scales``.
    Defences: ``sigma`` (``feature-noise``) with ``clip`` (``feature-noise-clip``, 0 = no
    clipping and no ε) and ``nopeek`` (``nopeek-weight``, NoPeek's λ)."""

    dataset: str
    method: str
    bits: int
    sigma: float
    seed: int
    threats: tuple[str, ...]
    text_mode: str = "ids"
    scale_sweep: bool = False
    clip: float = 0.0
    nopeek: float = 0.0
    converge: bool = False  # also the strong white-box attacker under Budget.converged's longer stopping rule

    def attacks(self, budget: Budget) -> list[Attack]:
        """Every row of this victim: per threat, the weak attacker and the strong one (white-box:
        at each scale of a ``scale_sweep``)."""
        sweep = sorted({1, *budget.public_scales}) if self.scale_sweep else [1]
        out = []
        for t in self.threats:
            if t == "mean-image":
                out.append(Attack(t, "none"))
            else:
                out += [Attack(t, "weak")] + [Attack(t, "strong", s) for s in (sweep if t == "white-box" else [1])]
                if t == "white-box" and self.converge and budget.converged is not None:
                    out.append(Attack(t, "converged"))
        return out

    def config(self, budget: Budget) -> SplitConfig:
        over: dict[str, object] = {**budget.base(), **method_overrides(self.method, self.bits)}
        over.update({"dataset": self.dataset, "seed": self.seed, "feature-noise": self.sigma,
                     "text-mode": self.text_mode})
        if self.clip:
            over["feature-noise-clip"] = self.clip
        if self.nopeek:
            over["nopeek-weight"] = self.nopeek
        return SplitConfig.from_run_config(over)

    def key(self, budget: Budget, attack: Attack) -> str:
        """Hash of everything that determines a result row (a weak or mean-image row hashes
        what it did before the strong attacker existed, so rows written then are reused)."""
        blob: dict[str, object] = {"cfg": self.config(budget).to_run_config(), "threat": attack.threat,
                                   "clients": CLIENTS, "aux": budget.aux_samples, "dec": asdict(budget.decoder),
                                   "sur": asdict(budget.surrogate)}
        if attack.attacker == "converged":
            blob |= {"attacker": "converged", "converged": asdict(budget.converged), "strong": asdict(budget.strong),
                     "val_seed": VAL_SEED}
        elif attack.attacker == "strong":
            blob |= {"attacker": "strong", "scale": attack.scale, "strong": asdict(budget.strong),
                     "val_seed": VAL_SEED}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]

    def keys(self, budget: Budget) -> set[str]:
        return {self.key(budget, a) for a in self.attacks(budget)}

    @property
    def name(self) -> str:
        text = "" if self.text_mode == "ids" else f"-text-{self.text_mode}"
        defence = (f"-c{self.clip:g}" if self.clip else "") + (f"-nopeek{self.nopeek:g}" if self.nopeek else "")
        return f"{self.dataset}-{self.method}-b{self.bits}-s{self.sigma:g}{defence}{text}-seed{self.seed}"


# ----------------------------------------------------------------------------- the grid
ACCEPT_DATASETS = ("faces", "pathology")
SEEDS = (0, 1, 2)  # the fine-tuning regime's, compared paired by seed
SCRATCH_SEEDS = (0, 1)
VQ_BITS = 8  # 256 codewords, 64 tokens x 8 bits = 64 bytes per image
SWEEP_BITS = (1, 2, 3, 4)
NOISE_SIGMAS = (0.25, 0.5, 1.0)
NOISE_METHODS = (("identity", 16), ("rdfsq", 1), ("rdfsq", 2), ("rdfsq", 3))
# Fine-tuning regime defences, on faces at RD-FSQ b = 2: the clip bound C, a little below the
# median L2 norm of one image's 64 x 128 connector features at the checkpoint (114 on public
# faces, 121 on pathology; RMS 1.3 a coordinate), with noise sigma from about the features'
# RMS to where the per-image epsilon starts to mean something; and NoPeek's lambda.
DP_CLIP = 100.0
DP_SIGMAS = (0.5, 2.0, 32.0)
NOPEEK_WEIGHTS = (1.0, 3.0)


def full_grid(regime: str = "finetune") -> list[Victim]:
    """The study's victims in ``regime``.

    ``finetune`` (3 seeds each): faces and pathology at identity and RD-FSQ b = 2 under both
    threat models (the verdict's pairs), RD-FSQ b = 1 and AlignedVQ white-box on faces, the
    clipped noise and NoPeek defences on faces at b = 2, and text-mode=quantized on faces.
    ``scratch``: the earlier study (2 seeds): acceptance, the compressor sweep, the unclipped
    noise defence and text-mode=quantized on faces."""
    both = ("white-box", "black-box", "mean-image")
    white = ("white-box", "mean-image")
    if regime == "finetune":
        out = [Victim(d, m, b, 0.0, s, both, scale_sweep=s == SEEDS[0], converge=s == SEEDS[0])
               for d in ACCEPT_DATASETS for s in SEEDS for m, b in (("identity", 16), ("rdfsq", 2))]
        out += [Victim("faces", "rdfsq", 1, 0.0, s, white) for s in SEEDS]
        out += [Victim("faces", "vq", VQ_BITS, 0.0, SEEDS[0], white)]  # one seed: the study's time budget
        out += [Victim("faces", "rdfsq", 2, sig, s, white, clip=DP_CLIP) for sig in DP_SIGMAS
                for s in (SEEDS if sig < max(DP_SIGMAS) else SEEDS[:1])]
        out += [Victim("faces", "rdfsq", 2, 0.0, s, white, nopeek=lam) for lam in NOPEEK_WEIGHTS for s in SEEDS]
        out += [Victim("faces", "rdfsq", 2, 0.0, s, ("white-box",), "quantized") for s in SEEDS]
        return out
    if regime != "scratch":
        raise ValueError(f"unknown regime {regime!r}; valid: {', '.join(REGIMES)}")
    accept = [("identity", 16), ("rdfsq", 1), ("rdfsq", 2), ("rdfsq", 3), ("vq", VQ_BITS)]
    out = [Victim(d, m, b, 0.0, s, both, scale_sweep=s == SCRATCH_SEEDS[0]) for d in ACCEPT_DATASETS
           for s in SCRATCH_SEEDS for m, b in accept]
    sweep = [("rdfsq", 4)] + [(m, b) for m in ("fsq", "nf", "topk") for b in SWEEP_BITS]
    out += [Victim("faces", m, b, 0.0, 0, white) for m, b in sweep]
    out += [Victim("faces", m, b, s, 0, white) for m, b in NOISE_METHODS for s in NOISE_SIGMAS]
    out += [Victim("faces", "rdfsq", 2, 0.0, seed, white, "quantized") for seed in SCRATCH_SEEDS]
    return out


def quick_grid(regime: str = "finetune") -> list[Victim]:
    """A few victims of every kind (CI smoke test); with ``finetune``, also a clipped-noise and a NoPeek one."""
    both = ("white-box", "black-box", "mean-image")
    out = [Victim("faces", "identity", 16, 0.0, 0, both, scale_sweep=True, converge=regime == "finetune"),
           Victim("faces", "rdfsq", 2, 0.0, 0, both),
           Victim("faces", "rdfsq", 2, 0.5, 0, ("white-box", "mean-image")),
           Victim("faces", "rdfsq", 2, 0.0, 0, ("white-box",), "quantized")]
    if regime == "finetune":
        out[2] = dataclasses.replace(out[2], clip=DP_CLIP)
        out.append(Victim("faces", "rdfsq", 2, 0.0, 0, ("white-box",), nopeek=0.3))
    return out


# ----------------------------------------------------------------------------- one victim
@dataclass
class VictimResult:
    rows: list[dict[str, object]] = field(default_factory=list)
    curves: list[dict[str, object]] = field(default_factory=list)  # CURVE_COLUMNS rows of the strong attackers
    examples: dict[str, np.ndarray] = field(default_factory=dict)  # truth / threat / threat-strong -> (k,H,W,3) uint8


def run_victim(v: Victim, budget: Budget, skip: set[str] | frozenset[str] = frozenset()) -> VictimResult:
    """Train, capture, attack one victim configuration; one row per :class:`Attack` whose key is not in ``skip``."""
    torch.set_num_threads(1)
    cfg = v.config(budget)
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_reference(cfg, CLIENTS)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    server = res.server
    capture = capture_eval_uplink(cfg, res.client_weights, VICTIM, CLIENTS)
    obs = observe(capture, cfg, server)
    rt = client_runtime(cfg, VICTIM, CLIENTS)  # ground truth only: the victim's held-out images
    truth = unit_images(rt.data, rt.test_idx)
    if len(truth) != len(obs.features):
        raise RuntimeError(f"{len(obs.features)} captured feature rows for {len(truth)} held-out images")
    attacks = VictimAttacks(cfg, res, obs, eval_text(rt.data, rt.test_idx), budget, v.seed)
    aux = attacks.pool(1)
    dp = feature_dp_summary(cfg, CLIENTS).get("feature_dp", {})
    common = {
        "regime": budget.regime, "dataset": v.dataset, "method": v.method, "bits": v.bits, "sigma": v.sigma,
        "clip": v.clip, "nopeek": v.nopeek, "seed": v.seed, "text_mode": v.text_mode,
        # per-image (ε, δ) of the clipped noise over the run (sim/training/feature_dp.py); blank without noise,
        # inf with noise but no clipping
        "epsilon": "" if not dp else (math.inf if dp["epsilon"] is None else dp["epsilon"]),
        "delta": dp.get("delta", ""), "releases_max": dp.get("releases_per_train_image_max", ""),
        "acc": res.accuracy[-1] if res.accuracy else math.nan,
        "acc_per_round": ";".join(f"{a:.4f}" for a in res.accuracy),
        "n_images": len(truth), "capture_bytes": capture.nbytes, "ledger_wire_bytes": capture.row.wire_bytes,
        "ledger_payload_bytes": capture.row.payload_bytes, "ledger_feature_bytes": capture.row.feature_bytes,
        "consumed_bytes": obs.consumed_bytes,
        "feature_bytes_per_image": obs.consumed_bytes / _padded(len(truth), cfg.batch_size),
        "train_s": round(train_s, 2), "train_cpu_s": round(train_cpu_s, 2),
    }
    with torch.no_grad():  # scale of the pre-noise features, to read sigma and the clip bound against
        feats = attacks.victim_model.features(pixels(aux, np.arange(min(256, len(aux))), image_processor(cfg)))
        common["feature_rms"] = float(feats.pow(2).mean().sqrt())
        common["feature_norm_median"] = float(feats.flatten(1).norm(dim=1).median())
    out = VictimResult()
    out.examples["truth"] = _uint8(truth[:EXAMPLES_PER_RUN])
    for a in v.attacks(budget):
        key = v.key(budget, a)
        if key in skip:
            continue
        t1, c1 = time.perf_counter(), time.process_time()
        img = attacks.images(a, len(truth))
        text, text_curve = attacks.text(a)
        psnr, ssim = image_metrics(img.rec, truth)
        ident = {"key": key, "threat": a.threat, "attacker": a.attacker, "public_scale": a.scale}
        curve = img.curve
        out.rows.append({**common, **ident, "psnr": float(psnr.mean()), "psnr_std": float(psnr.std(ddof=1)),
                         "ssim": float(ssim.mean()), "ssim_std": float(ssim.std(ddof=1)),
                         "prompt_token_recovery": text.prompt_tokens, "prompt_exact_recovery": text.prompts_exact,
                         "answer_recovery": text.answers, "public_images": img.public_images,
                         "decoder_steps": "" if img.decoder_steps is None else img.decoder_steps,
                         "best_step": curve.best_step if curve else "", "val_psnr": curve.best_score if curve else "",
                         "stopped_early": curve.stopped_early if curve else "",
                         "attack_s": round(time.perf_counter() - t1, 2),
                         "attack_cpu_s": round(time.process_time() - c1, 2)})
        out.curves += _curve_rows({**common, **ident}, curve, "image") + _curve_rows({**common, **ident}, text_curve, "text")
        if a.attacker != "none" and a.scale == 1:
            out.examples[a.threat if a.attacker == "weak" else f"{a.threat}-{a.attacker}"] = _uint8(img.rec[:EXAMPLES_PER_RUN])
    return out


def _curve_rows(ident: dict[str, object], curve: LearningCurve | None, target: str) -> list[dict[str, object]]:
    """``curve`` as CURVE_COLUMNS rows; ``target`` ``image`` (score: PSNR, dB) or ``text`` (token accuracy)."""
    if curve is None:
        return []
    score = "val_psnr" if target == "image" else "val_token_accuracy"
    return [{**ident, "target": target, "step": t, "train_loss": loss, score: val}
            for t, loss, val in zip(curve.step, curve.train_loss, curve.val_score)]


def _padded(n: int, batch: int) -> int:
    return -(-n // batch) * batch


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- files
def save_examples(path: Path, examples: dict[str, np.ndarray]) -> None:
    """Write ``examples`` to ``path`` (npz), keeping the arrays of an earlier run that this one did not redo."""
    old = dict(np.load(path)) if path.exists() else {}
    np.savez_compressed(path, **(old | examples))


def run_study(grid: list[Victim], budget: Budget, csv_path: Path, examples_dir: Path, jobs: int = 1) -> list[str]:
    """Run the rows of every victim that are not in ``csv_path`` yet (their learning curves go
    to :func:`curves_path`), ``jobs`` victims at a time in separate processes (each on one
    torch thread; rows are written by this process as each victim finishes, in any order, and
    do not depend on ``jobs``); returns error messages."""
    done = done_keys(csv_path)
    examples_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    todo = [v for v in grid if not v.keys(budget) <= done]
    log.info("%d victim configurations, %d to run on %d process(es)", len(grid), len(todo), jobs)
    if jobs > 1 and len(todo) > 1:
        pool = ProcessPoolExecutor(min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn"))
        futures = {pool.submit(_timed_victim, v, budget, done): v for v in todo}
        finished = ((futures[f], f) for f in as_completed(futures))
    else:
        pool, finished = None, ((v, None) for v in todo)
    try:
        for i, (v, future) in enumerate(finished, 1):
            try:
                result, wall_s = future.result() if future is not None else _timed_victim(v, budget, done)
            except Exception as err:  # one failed configuration must not lose the others; rerun retries it
                log.error("%s failed: %s: %s", v.name, type(err).__name__, err, exc_info=err)
                errors.append(f"{v.name}: {type(err).__name__}: {err}")
                continue
            append_rows(curves_path(csv_path), result.curves, CURVE_COLUMNS)  # first: a row is done only with its curve
            append_rows(csv_path, result.rows)
            save_examples(examples_dir / f"{v.name}.npz", result.examples)
            psnr = {(r["threat"], r["attacker"]): r["psnr"] for r in result.rows if r["public_scale"] == 1}
            log.info("[%d/%d] %s: acc %.3f, white-box PSNR %.2f dB (weak) / %.2f dB (strong), %.0f s", i, len(todo),
                     v.name, result.rows[0]["acc"] if result.rows else math.nan,
                     psnr.get(("white-box", "weak"), math.nan), psnr.get(("white-box", "strong"), math.nan), wall_s)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return errors


def _timed_victim(v: Victim, budget: Budget, skip: set[str]) -> tuple[VictimResult, float]:
    t0 = time.perf_counter()
    return run_victim(v, budget, skip), time.perf_counter() - t0


def curves_path(csv_path: Path) -> Path:
    """The learning-curve CSV beside the results CSV."""
    return csv_path.with_name(csv_path.stem + "_curves.csv")


def _scales(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers >= 1, e.g. 1,2,4; got {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.inversion", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy budget and grid (CI smoke test, < 3 min)")
    p.add_argument("--regime", choices=REGIMES, default="finetune",
                   help="finetune (default, the headline: victims fine-tune the shipped checkpoint; rows in "
                   "privacy.csv) or scratch (the earlier study from random weights; rows in privacy_scratch.csv); "
                   "the report shows both")
    p.add_argument("--jobs", type=int, default=1, help="victims trained and attacked at once, one process and "
                   "one torch thread each (default 1; results do not depend on it)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default experiments/results, "
                   "or runs/privacy-quick with --quick)")
    p.add_argument("--examples", type=Path, default=None, help="example reconstructions (default runs/privacy-examples; "
                   "kept out of the repository: the faces are photographs of real people)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the existing CSV")
    p.add_argument("--public-scale", type=_scales, default=None, metavar="S,S,...",
                   help="sizes of the strong attacker's public pool, as multiples of the budget's aux_samples, for "
                   "the victims that sweep it (default: 1,2,4; with --quick 1,2); 1x always runs")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    from experiments.privacy_text import write_report

    out = args.out or (ROOT / "runs" / "privacy-quick" if args.quick else RESULTS)
    examples = args.examples or (out / "examples" if args.quick else ROOT / "runs" / "privacy-examples")
    out.mkdir(parents=True, exist_ok=True)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    csv_path = out / ("privacy.csv" if args.regime == "finetune" else "privacy_scratch.csv")
    if args.regime == "scratch":
        examples = examples / "scratch"
    budget = BUDGETS[(args.regime, args.quick)]
    if args.public_scale is not None:
        budget = dataclasses.replace(budget, public_scales=args.public_scale)
    errors: list[str] = []
    config_path = csv_path.with_name(csv_path.stem + "_config.json")  # privacy_config.json, privacy_scratch_config.json
    previous = json.loads(config_path.read_text()) if config_path.exists() else {}
    study_wall_s = previous.get("study_wall_s")
    if not args.report_only:
        grid = quick_grid(args.regime) if args.quick else full_grid(args.regime)
        keys = set().union(*(v.keys(budget) for v in grid))
        stale = set_aside_stale(csv_path, keys)
        set_aside_stale(curves_path(csv_path), keys, CURVE_COLUMNS)
        if stale:
            log.warning("%d rows of %s belong to another grid or config; moved to %s", stale, csv_path,
                        csv_path.with_name(csv_path.stem + "_stale.csv"))
        t0 = time.perf_counter()
        before = len(done_keys(csv_path))
        errors = run_study(grid, budget, csv_path, examples, args.jobs)
        if len(done_keys(csv_path)) > before:  # something ran: this command's wall time
            study_wall_s = round(time.perf_counter() - t0, 1)
        log.info("study finished in %.0f s", time.perf_counter() - t0)
    config_path.write_text(json.dumps(
        {"regime": budget.regime, "base": budget.base(),
         "budget": {"train": budget.train, "aux_samples": budget.aux_samples, "decoder": asdict(budget.decoder),
                    "surrogate": asdict(budget.surrogate), "strong": asdict(budget.strong),
                    "converged": asdict(budget.converged) if budget.converged is not None else None,
                    "public_scales": list(budget.public_scales)},
         "clients": CLIENTS, "victim_partition": VICTIM, "aux_seed": AUX_SEED, "val_seed": VAL_SEED,
         "vq_split": VQ_SPLIT,
         "errors": errors, "study_wall_s": study_wall_s}, indent=2))
    headline = out / "privacy.csv"  # the report reads privacy_scratch.csv beside it too
    write_report(headline if headline.exists() else csv_path, examples, out, quick=args.quick)
    for e in errors:
        log.error("failed: %s", e)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
