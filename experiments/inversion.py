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

Rows go to ``privacy.csv`` (one per victim x threat, appended as they finish; a rerun
skips the rows already there) and example reconstructions to ``--examples``; the
report (privacy.md, plots, the grid of examples) is built from those files by
:mod:`experiments.privacy_report`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from experiments.attack import (
    DecoderBudget, SurrogateBudget, TextInverter, fit_decoder, image_metrics, reconstruct, surrogate_client,
    unit_images, victim_client, wire_features,
)
from experiments.common import SCRATCH, method_overrides, setup_logging
from experiments.privacy_capture import capture_eval_uplink, observe, text_recovery
from sim.compress import get_codec
from sim.config import SplitConfig
from sim.data import CASE_STUDY_DATASETS
from sim.data.batches import eval_text, pixels, tokenise
from sim.data.tokenizer import get_tokenizer
from sim.model.processor import image_processor
from sim.training.client import client_runtime
from sim.training.reference import run_reference

log = logging.getLogger("experiments.inversion")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
CLIENTS = 2
VICTIM = 0  # partition whose held-out images are attacked
AUX_SEED = 7_777  # seed of the attacker's public images (their pool is disjoint anyway)
EXAMPLES_PER_RUN = 8
THREATS = ("white-box", "black-box", "mean-image")
VQ_SPLIT = get_codec("vq").sweep["split-point"]  # AlignedVQ's split point: after LayerNorm 1 of vision block 0


@dataclass(frozen=True)
class Budget:
    """Everything that sizes a study: the training run, the public pool, the attacker."""

    train: dict[str, object]
    aux_samples: int
    decoder: DecoderBudget
    surrogate: SurrogateBudget


# Full study: a tiny model (width 64, 2 ViT + 2 LLM layers, 32 px, 64 image tokens) trained
# for 6 rounds x 20 micro-batches of 16 per client (2 clients: 120 server steps of 32),
# 1 600 samples (720 training and 80 held-out images per client).
FULL = Budget(
    train={
        "num-server-rounds": 6, "local-steps": 20, "steps-per-exchange": 20, "batch-size": 16,
        "warmup-steps": 10, "num-samples": 1600, "test-fraction": 0.1, "hidden-size": 64,
        "image-size": 32, "patch-size": 4,
    },
    aux_samples=1600,
    decoder=DecoderBudget(steps=300, batch=64, lr=3e-3, width=64),
    surrogate=SurrogateBudget(steps=60, batch=32, lr=1e-3),
)
# --quick: the same pipeline on a toy budget (CI smoke test); its numbers mean nothing.
QUICK = Budget(
    train={
        "num-server-rounds": 1, "local-steps": 4, "steps-per-exchange": 2, "batch-size": 8,
        "warmup-steps": 1, "num-samples": 160, "test-fraction": 0.2, "hidden-size": 32,
        "image-size": 16, "patch-size": 4,
    },
    aux_samples=96,
    decoder=DecoderBudget(steps=20, batch=32, lr=3e-3, width=16),
    surrogate=SurrogateBudget(steps=4, batch=8, lr=1e-3),
)


@dataclass(frozen=True)
class Victim:
    """One victim configuration and the threat models to run against it."""

    dataset: str
    method: str
    bits: int
    sigma: float
    seed: int
    threats: tuple[str, ...]
    text_mode: str = "ids"

    def config(self, budget: Budget) -> SplitConfig:
        over: dict[str, object] = {**SCRATCH, **budget.train, **method_overrides(self.method, self.bits)}
        over.update({"dataset": self.dataset, "seed": self.seed, "feature-noise": self.sigma,
                     "text-mode": self.text_mode})
        return SplitConfig.from_run_config(over)

    def key(self, budget: Budget, threat: str) -> str:
        """Hash of everything that determines a result row."""
        blob = json.dumps({"cfg": self.config(budget).to_run_config(), "threat": threat, "clients": CLIENTS,
                           "aux": budget.aux_samples, "dec": asdict(budget.decoder),
                           "sur": asdict(budget.surrogate)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        text = "" if self.text_mode == "ids" else f"-text-{self.text_mode}"
        return f"{self.dataset}-{self.method}-b{self.bits}-s{self.sigma:g}{text}-seed{self.seed}"


# ----------------------------------------------------------------------------- the grid
ACCEPT_DATASETS = ("faces", "pathology")
SEEDS = (0, 1)
VQ_BITS = 8  # 256 codewords, 64 tokens x 8 bits = 64 bytes per image
SWEEP_BITS = (1, 2, 3, 4)
NOISE_SIGMAS = (0.25, 0.5, 1.0)
NOISE_METHODS = (("identity", 16), ("rdfsq", 1), ("rdfsq", 2), ("rdfsq", 3))


def full_grid() -> list[Victim]:
    """Acceptance (faces and pathology, 2 seeds, both threats), the compressor sweep (faces,
    seed 0, white-box), the noise defence (faces, seed 0, white-box) and text-mode=quantized
    (faces, 2 seeds, white-box). About 30 min of one core on the project machine."""
    both = ("white-box", "black-box", "mean-image")
    accept = [("identity", 16), ("rdfsq", 1), ("rdfsq", 2), ("rdfsq", 3), ("vq", VQ_BITS)]
    out = [Victim(d, m, b, 0.0, s, both) for d in ACCEPT_DATASETS for s in SEEDS for m, b in accept]
    sweep = [("rdfsq", 4)] + [(m, b) for m in ("fsq", "nf", "topk") for b in SWEEP_BITS]
    out += [Victim("faces", m, b, 0.0, 0, ("white-box", "mean-image")) for m, b in sweep]
    out += [Victim("faces", m, b, s, 0, ("white-box", "mean-image")) for m, b in NOISE_METHODS for s in NOISE_SIGMAS]
    out += [Victim("faces", "rdfsq", 2, 0.0, seed, ("white-box", "mean-image"), "quantized") for seed in SEEDS]
    return out


def quick_grid() -> list[Victim]:
    both = ("white-box", "black-box", "mean-image")
    return [Victim("faces", "identity", 16, 0.0, 0, both), Victim("faces", "rdfsq", 2, 0.0, 0, both),
            Victim("faces", "rdfsq", 2, 0.5, 0, ("white-box", "mean-image")),
            Victim("faces", "rdfsq", 2, 0.0, 0, ("white-box",), "quantized")]


# ----------------------------------------------------------------------------- one victim
COLUMNS = (
    "key", "dataset", "method", "bits", "sigma", "seed", "text_mode", "threat",
    "acc", "acc_per_round", "psnr", "psnr_std", "ssim", "ssim_std", "n_images",
    "capture_bytes", "ledger_wire_bytes", "ledger_payload_bytes", "ledger_feature_bytes", "consumed_bytes",
    "feature_bytes_per_image", "prompt_token_recovery", "answer_recovery", "feature_rms",
    "train_s", "train_cpu_s", "attack_s", "attack_cpu_s",
)


@dataclass
class VictimResult:
    rows: list[dict[str, object]] = field(default_factory=list)
    examples: dict[str, np.ndarray] = field(default_factory=dict)  # truth / threat -> (k,H,W,3) uint8


def public_pool(cfg: SplitConfig, n: int):
    """The attacker's labelled public images, tokenised with the run's tokenizer."""
    examples = CASE_STUDY_DATASETS[cfg.dataset](n, AUX_SEED, cfg.image_size, "public")
    return tokenise(examples, get_tokenizer(cfg))


def run_victim(v: Victim, budget: Budget) -> VictimResult:
    """Train, capture, attack one victim configuration; one row per threat model."""
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
    aux = public_pool(cfg, budget.aux_samples)
    aux_images = unit_images(aux)
    common = {
        "dataset": v.dataset, "method": v.method, "bits": v.bits, "sigma": v.sigma, "seed": v.seed,
        "text_mode": v.text_mode,
        "acc": res.accuracy[-1] if res.accuracy else math.nan,
        "acc_per_round": ";".join(f"{a:.4f}" for a in res.accuracy),
        "n_images": len(truth), "capture_bytes": capture.nbytes, "ledger_wire_bytes": capture.row.wire_bytes,
        "ledger_payload_bytes": capture.row.payload_bytes, "ledger_feature_bytes": capture.row.feature_bytes,
        "consumed_bytes": obs.consumed_bytes,
        "feature_bytes_per_image": obs.consumed_bytes / _padded(len(truth), cfg.batch_size),
        "train_s": round(train_s, 2), "train_cpu_s": round(train_cpu_s, 2),
    }
    out = VictimResult()
    out.examples["truth"] = _uint8(truth[:EXAMPLES_PER_RUN])
    victim_model = victim_client(cfg, res.client_weights, server.vocab_size)
    reader = TextInverter(victim_model, server, aux, cfg.batch_size) if cfg.text_mode == "quantized" else None
    common["prompt_token_recovery"], common["answer_recovery"] = text_recovery(
        obs, *eval_text(rt.data, rt.test_idx), read_prompt=reader)
    with torch.no_grad():  # scale of the pre-noise features, to read sigma against
        common["feature_rms"] = float(victim_model.features(pixels(aux, np.arange(min(256, len(aux))), image_processor(cfg))).pow(2).mean().sqrt())
    for threat in v.threats:
        t1, c1 = time.perf_counter(), time.process_time()
        if threat == "mean-image":
            rec = aux_images.mean(0, keepdim=True).expand_as(truth)
        else:
            black = threat == "black-box"
            enc = surrogate_client(cfg, server, aux, res.client_weights, budget.surrogate, seed=v.seed + 1000) \
                if black else victim_model
            dec = fit_decoder(wire_features(enc, server, aux, cfg.batch_size), aux_images, budget.decoder, seed=v.seed)
            rec = reconstruct(dec, obs.features, own_statistics=black)
        psnr, ssim = image_metrics(rec, truth)
        out.rows.append({**common, "key": v.key(budget, threat), "threat": threat,
                         "psnr": float(psnr.mean()), "psnr_std": float(psnr.std(ddof=1)),
                         "ssim": float(ssim.mean()), "ssim_std": float(ssim.std(ddof=1)),
                         "attack_s": round(time.perf_counter() - t1, 2),
                         "attack_cpu_s": round(time.process_time() - c1, 2)})
        if threat != "mean-image":
            out.examples[threat] = _uint8(rec[:EXAMPLES_PER_RUN])
    return out


def _padded(n: int, batch: int) -> int:
    return -(-n // batch) * batch


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- files
def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "key" not in reader.fieldnames:
            raise ValueError(f"{path}: not a privacy results CSV (no 'key' column); move it away to start over")
        return {row["key"] for row in reader}


def append_rows(path: Path, rows: list[dict[str, object]]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in COLUMNS})


def set_aside_stale(path: Path, keys: set[str]) -> int:
    """Move the rows of ``path`` whose key is not in ``keys`` (made with another grid,
    budget or config schema) to ``<stem>_stale.csv`` beside it, so the report only sees
    rows of the current study and nothing written earlier is lost. Returns their count."""
    if not path.exists():
        return 0
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    stale = [r for r in rows if r["key"] not in keys]
    if stale:
        append_rows(path.with_name(path.stem + "_stale.csv"), stale)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        append_rows(tmp, [r for r in rows if r["key"] in keys])
        tmp.replace(path)
    return len(stale)


def run_study(grid: list[Victim], budget: Budget, csv_path: Path, examples_dir: Path) -> list[str]:
    """Run every victim whose rows are not all in ``csv_path``; returns error messages."""
    done = done_keys(csv_path)
    examples_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    todo = [v for v in grid if any(v.key(budget, t) not in done for t in v.threats)]
    log.info("%d victim configurations, %d to run", len(grid), len(todo))
    for i, v in enumerate(todo, 1):
        t0 = time.perf_counter()
        try:
            result = run_victim(v, budget)
        except Exception as err:  # one failed configuration must not lose the others; rerun retries it
            log.exception("%s failed", v.name)
            errors.append(f"{v.name}: {type(err).__name__}: {err}")
            continue
        append_rows(csv_path, [r for r in result.rows if r["key"] not in done])
        np.savez_compressed(examples_dir / f"{v.name}.npz", **result.examples)
        wb = next((r for r in result.rows if r["threat"] == "white-box"), None)
        log.info("[%d/%d] %s: acc %.3f, white-box PSNR %.2f dB, %.0f s", i, len(todo), v.name,
                 result.rows[0]["acc"], wb["psnr"] if wb else math.nan, time.perf_counter() - t0)
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.inversion", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy budget and grid (CI smoke test, < 3 min)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default experiments/results, "
                   "or runs/privacy-quick with --quick)")
    p.add_argument("--examples", type=Path, default=None, help="example reconstructions (default runs/privacy-examples; "
                   "kept out of the repository: the faces are photographs of real people)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the existing CSV")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    from experiments.privacy_text import write_report

    out = args.out or (ROOT / "runs" / "privacy-quick" if args.quick else RESULTS)
    examples = args.examples or (out / "examples" if args.quick else ROOT / "runs" / "privacy-examples")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "privacy.csv"
    budget = QUICK if args.quick else FULL
    errors: list[str] = []
    previous = json.loads((out / "privacy_config.json").read_text()) if (out / "privacy_config.json").exists() else {}
    study_wall_s = previous.get("study_wall_s")
    if not args.report_only:
        grid = quick_grid() if args.quick else full_grid()
        stale = set_aside_stale(csv_path, {v.key(budget, t) for v in grid for t in v.threats})
        if stale:
            log.warning("%d rows of %s belong to another grid or config; moved to %s", stale, csv_path,
                        csv_path.with_name(csv_path.stem + "_stale.csv"))
        t0 = time.perf_counter()
        before = len(done_keys(csv_path))
        errors = run_study(grid, budget, csv_path, examples)
        if len(done_keys(csv_path)) > before:  # something ran: this command's wall time
            study_wall_s = round(time.perf_counter() - t0, 1)
        log.info("study finished in %.0f s", time.perf_counter() - t0)
    (out / "privacy_config.json").write_text(json.dumps(
        {"budget": {"train": budget.train, "aux_samples": budget.aux_samples, "decoder": asdict(budget.decoder),
                    "surrogate": asdict(budget.surrogate)},
         "clients": CLIENTS, "victim_partition": VICTIM, "aux_seed": AUX_SEED, "vq_split": VQ_SPLIT,
         "errors": errors, "study_wall_s": study_wall_s}, indent=2))
    write_report(csv_path, examples, out, quick=args.quick)
    for e in errors:
        log.error("failed: %s", e)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
