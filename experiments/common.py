"""Shared parts of the experiment drivers: the per-run budget, one measured run, the
resumable results CSV, mean ± std summaries.

One sweep run (:func:`run_one`)::

    RunSpec (base budget + method, bits, seed) -> SplitConfig
      --sim.training.reference.run_reference-->  final client weights, exact match per question type,
                                                  and the ledger of every message of the run
      --the ledger rows of round 1, partition 0: exchange 0's reply, exchange 1's request-->
        bytes per training sample, up and down, as Flower serialises them

The reference trainer is the round engine of the Flower strategy run in process
(``tests/test_simulation.py`` checks the two give the same losses), faster than the Ray
simulation, so the sweeps use it; its ledger counts the same messages the Flower run
sends. ``experiments.comm`` checks these per-sample numbers against the ledger of real
Flower runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sim.config.keys import FROM_SCRATCH

log = logging.getLogger(__name__)

QTYPES = ("colour", "shape", "count", "position", "relational", "llava")
QTYPE_GROUPS = {"perception": ("colour", "shape", "position"), "reasoning": ("count", "relational")}

# ------------------------------------------------------------------ budgets
# The experiments below are the from-scratch regime (random initialisation, synthetic data,
# the finetune stage; their committed results in experiments/results/ are labelled so): every
# config they build starts from FROM_SCRATCH (sim/config/keys.py), the values the project's
# default job (split fine-tuning of the shipped checkpoint) changed, so they produce what they
# produced when those were the defaults. One constant for all of them: SCRATCH.
SCRATCH: dict[str, object] = dict(FROM_SCRATCH)
# Settings every sweep run pins explicitly, so that a change of the project's defaults
# cannot silently mix two recipes in one results file (a run's key hashes its overrides;
# the SCRATCH values are left out of the hash, see RunSpec.key).
PINNED: dict[str, object] = {
    **SCRATCH,
    "lr": 0.001, "lr-schedule": "cosine", "min-lr-ratio": 0.1, "weight-decay": 0.0,
    "rdfsq-stats": "per-dim", "rdfsq-alpha": 0.0, "grad-compressor": "none", "image-position": "after-question",
    "partitioner": "iid", "test-fraction": 0.1, "vision-layers": 2, "llm-layers": 2,
}
# The fixed budget of one sweep run: 2 clients x 4 rounds x 125 micro-batches of 8
# = 8 000 training samples (1.5 epochs of the 5 400 training samples), AdamW 1e-3 with
# 50 warm-up steps and cosine decay; evaluation on all 600 local test samples. Measured
# on this 2-core machine: ~70 s of CPU per run with one torch thread.
SWEEP_CLIENTS = 2
SWEEP_BUDGET: dict[str, object] = {
    **PINNED,
    "num-server-rounds": 4,
    "local-steps": 125,
    "steps-per-exchange": 25,
    "batch-size": 8,
    "warmup-steps": 50,
    "num-samples": 6000,
    "hidden-size": 128,
    "image-size": 32,
    "patch-size": 4,
}
# --quick: a smoke version of the same pipeline (tiny model, a few steps); its accuracies mean nothing.
QUICK_BUDGET: dict[str, object] = {
    **PINNED,
    "num-server-rounds": 1,
    "local-steps": 4,
    "steps-per-exchange": 2,
    "batch-size": 4,
    "warmup-steps": 1,
    "num-samples": 120,
    "hidden-size": 64,
    "image-size": 16,
    "patch-size": 4,
}

# The fine-tuning regime (issue 16, docs/foundation.md): the default job, split fine-tuning of
# the shipped checkpoint on the default case study with 4 clients, every recipe key pinned at the
# value it had when the regime's results were made (so a later change of the project's defaults
# cannot mix two recipes in one results file; these keys are hashed into a run's key).
FINETUNE_CLIENTS = 4  # the default run's (`python -m sim run --clients 4`, README)
FINETUNE_BUDGET: dict[str, object] = {
    "init": "checkpoints/tiny-vlm", "dataset": "pathology", "stage": "both", "train-vision-tower": "auto",
    "num-server-rounds": 8, "align-rounds": 1, "local-steps": 60, "steps-per-exchange": 30, "warmup-steps": 10,
    "batch-size": 8, "align-batch-size": 8, "lr": 5e-4, "align-lr": 5e-4, "lr-schedule": "cosine",
    "min-lr-ratio": 0.1, "weight-decay": 0.0, "llm-lora-rank": 0,
    "rdfsq-stats": "per-dim", "rdfsq-alpha": 0.0, "rdfsq-send-range": True,
    "grad-compressor": "lowrank", "lowrank-rank": 4, "client-finetune": "frozen",
    "image-position": "after-question", "partitioner": "iid", "test-fraction": 0.1, "checkpoint": False,
}
# --quick in that regime: a few steps of the same job (its accuracies mean nothing).
FINETUNE_QUICK: dict[str, object] = {
    **FINETUNE_BUDGET,
    "num-server-rounds": 2, "local-steps": 2, "steps-per-exchange": 1, "batch-size": 4, "align-batch-size": 4,
    "num-samples": 120, "warmup-steps": 1,
}
REGIMES = ("finetune", "scratch")


def regime_budget(regime: str, quick: bool) -> tuple[dict[str, object], int]:
    """The base run config and client count of a sweep in ``regime`` (``finetune``: split
    fine-tuning of the shipped checkpoint, the headline; ``scratch``: random initialisation on
    the synthetic benchmark, the earlier results)."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; valid: {', '.join(REGIMES)}")
    if regime == "finetune":
        return dict(FINETUNE_QUICK if quick else FINETUNE_BUDGET), FINETUNE_CLIENTS
    return dict(QUICK_BUDGET if quick else SWEEP_BUDGET), SWEEP_CLIENTS


IDENTITY_BITS = 16  # a codec whose width is its dtype's (identity: fp16) is labelled with 16 bits


def methods() -> tuple[str, ...]:
    """The compared methods: every registered codec that can serve the image stream, the
    fp16 baseline first."""
    from sim.compress import codec_names

    names = codec_names("image")
    return tuple(sorted(names, key=lambda n: (n != "identity", n)))


def method_overrides(method: str, bits: int) -> dict[str, object]:
    """Run-config keys that select ``method`` at ``bits``: the codec, its width (fixed at
    :data:`IDENTITY_BITS` for a codec without one), the connector split for a codec whose
    width is swept, and whatever its module asks for comparisons (``Codec.sweep``: e.g.
    AlignedVQ's split after LayerNorm 1 of ViT block 0)."""
    from sim.compress import get_codec

    if method not in methods():
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(methods())}")
    codec = get_codec(method)
    out: dict[str, object] = {"compressor": method, "bits": bits if codec.bit_unit else IDENTITY_BITS}
    if codec.bit_unit and "split-point" not in codec.sweep:
        out["split-point"] = "connector"
    return {**out, **codec.sweep}


# ------------------------------------------------------------------ one run
@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep: labels plus the complete run-config overrides."""

    dataset: str
    method: str
    bits: int
    seed: int
    clients: int
    overrides: tuple[tuple[str, object], ...]

    @property
    def label(self) -> str:
        return f"{self.method} b={self.bits} seed={self.seed}"

    def run(self) -> dict[str, object]:
        return run_one(self)

    def config(self):
        from sim.config import SplitConfig

        return SplitConfig.from_run_config(dict(self.overrides))

    def key(self) -> str:
        """Hash of the run-config overrides and client count: a row with this key is this run.

        The overrides pin the recipe (:data:`PINNED`); keys the sweep leaves at the
        project's defaults are not part of the key, so a results CSV outlives unrelated
        new config keys. Nor are the :data:`SCRATCH` values, which were those defaults when
        the committed results were made: their keys stay valid. Validates the config."""
        self.config()
        at_scratch = {k for k, v in self.overrides if k in SCRATCH and SCRATCH[k] == v and type(SCRATCH[k]) is type(v)}
        hashed = {k: v for k, v in self.overrides if k not in at_scratch}
        blob = json.dumps({"overrides": hashed, "clients": self.clients}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_spec(dataset: str, method: str, bits: int, seed: int, clients: int, base: dict[str, object]) -> RunSpec:
    cfg = {**base, **method_overrides(method, bits), "seed": seed}
    return RunSpec(dataset, method, int(cfg["bits"]), seed, clients, tuple(sorted(cfg.items())))


@dataclass(frozen=True)
class ExchangeBytes:
    """Bytes of one steady-state exchange of one client, divided by the samples it carries.

    ``feature``: packed codes + side information (the ``features`` record's arrays);
    ``up_payload``: plus token ids and loss mask; ``up_wire``: the whole
    ``train.split_step`` reply as Flower serialises it; ``down_payload`` and
    ``down_wire``: the next request, which carries the gradients of those samples;
    ``round_start_wire``: the first request of a round (global client weights +
    config), once per client per round, not per sample.
    """

    samples: int
    feature: float
    up_payload: float
    up_wire: float
    down_payload: float
    down_wire: float
    round_start_wire: int


def exchange_bytes(cfg, ledger, weights: dict) -> ExchangeBytes:
    """The bytes of partition 0's first exchanges of round 1, from a run's own ledger:
    exchange 0's reply (the codes of the first ``steps-per-exchange`` micro-batches) and
    exchange 1's request (their gradients), per training sample; and a round's first
    request (the global client weights and the config) built with the final ``weights``:
    Flower sends each distinct chunk of a message once, so the initial weights' repeated
    values (zero biases, unit norms) make round 1's first request smaller than later ones."""
    from flwr.app import Message

    from sim.training.server import exchange_schedule
    from sim.training.transport import ensure_task_identity
    from sim.wire.arrays import wire_bytes
    from sim.wire.messages import TRAIN, train_request

    batch_size, steps_per_exchange = cfg.batch_size, cfg.steps_per_exchange
    def row(exchange: int, direction: str):
        rows = [r for r in ledger.rows if (r.round, r.exchange, r.partition, r.direction, r.kind)
                == (1, exchange, 0, direction, "train.split_step")]
        if len(rows) != 1:
            raise ValueError(f"the ledger has {len(rows)} rows for round 1, exchange {exchange}, partition 0, {direction}")
        return rows[0]

    up, down = row(0, "up"), row(1, "down")
    n = steps_per_exchange * batch_size
    if up.samples != n:
        raise ValueError(f"exchange 0 carries {up.samples} samples, expected {n}")
    ensure_task_identity()
    apply, encode = exchange_schedule(cfg)[0]
    start = Message(train_request(cfg, 1, 0, apply, encode, False, weights=weights), dst_node_id=1, message_type=TRAIN)
    return ExchangeBytes(
        samples=n, feature=up.feature_bytes / n, up_payload=up.payload_bytes / n, up_wire=up.wire_bytes / n,
        down_payload=down.payload_bytes / n, down_wire=down.wire_bytes / n, round_start_wire=wire_bytes(start),
    )


def ready_runtimes(cfg, clients: int):
    """Client runtime (partition 0), server runtime and the client state before round 1, with the
    codecs' data-dependent state (AlignedVQ k-means codebook, RD-FSQ EMA statistics) initialised
    and installed on the server as the round engine does; for measuring an untrained model's messages."""
    from sim.training.client import client_runtime, init_codec_state, load_weights
    from sim.training.server import build_server, initial_client_weights, sync_round_state

    rt = client_runtime(cfg, 0, clients)
    load_weights(rt, initial_client_weights(cfg))
    server = build_server(cfg)
    weights = sync_round_state(server, init_codec_state(rt))
    load_weights(rt, weights)
    return rt, server, weights


def accuracy_columns(counts: dict[str, tuple[int, int]]) -> dict[str, float]:
    """``acc`` overall, ``acc_<type>`` per question type and per group (perception, reasoning), ``n_<type>``."""
    out: dict[str, float] = {}
    c, n = counts.get("all", (0, 0))
    out["acc"], out["n_test"] = (c / n if n else math.nan), n
    for q in QTYPES:
        c, n = counts.get(q, (0, 0))
        out[f"acc_{q}"], out[f"n_{q}"] = (c / n if n else math.nan), n
    for group, members in QTYPE_GROUPS.items():
        c = sum(counts.get(q, (0, 0))[0] for q in members)
        n = sum(counts.get(q, (0, 0))[1] for q in members)
        out[f"acc_{group}"] = c / n if n else math.nan
    return out


RESULT_COLUMNS = (
    "key", "dataset", "method", "bits", "seed", "clients", "samples",
    "acc", "acc_perception", "acc_reasoning", *(f"acc_{q}" for q in QTYPES), "n_test", *(f"n_{q}" for q in QTYPES),
    "acc_per_round", "final_loss",
    "feature_bytes_per_sample", "up_payload_bytes_per_sample", "up_wire_bytes_per_sample",
    "down_payload_bytes_per_sample", "down_wire_bytes_per_sample", "round_start_wire_bytes",
    "train_s", "wall_s",
)


def run_one(spec: RunSpec) -> dict[str, object]:
    """Train one configuration with the reference trainer and measure its messages (one torch thread)."""
    import torch

    from sim.training.reference import run_reference

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = spec.config()
    res = run_reference(cfg, spec.clients)
    b = exchange_bytes(cfg, res.ledger, res.client_weights)
    row: dict[str, object] = {
        "key": spec.key(), "dataset": spec.dataset, "method": spec.method, "bits": spec.bits, "seed": spec.seed,
        "clients": spec.clients, "samples": res.samples,
        **accuracy_columns(res.eval_counts),
        "acc_per_round": ";".join(f"{a:.4f}" for a in res.accuracy),
        "final_loss": float(np.mean(res.step_losses[-cfg.steps_per_exchange:])) if res.step_losses else math.nan,
        "feature_bytes_per_sample": b.feature, "up_payload_bytes_per_sample": b.up_payload,
        "up_wire_bytes_per_sample": b.up_wire, "down_payload_bytes_per_sample": b.down_payload,
        "down_wire_bytes_per_sample": b.down_wire, "round_start_wire_bytes": b.round_start_wire,
        "train_s": round(res.train_s, 2), "wall_s": round(time.perf_counter() - t0, 2),
    }
    return row


# ------------------------------------------------------------------ resumable CSV
def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    try:
        return set(pd.read_csv(path, usecols=["key"], dtype=str)["key"])
    except (ValueError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path}: not a results CSV with a 'key' column ({err}); move it away to start over") from None


def append_row(path: Path, row: dict[str, object], columns: tuple[str, ...] = RESULT_COLUMNS) -> None:
    """Append one row (header first if the file is new); the file is never rewritten."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in columns})


def add_table_row(path: Path, row: dict[str, object]) -> None:
    """Add one row to a small log CSV, keeping every earlier row as written (read as text);
    unlike :func:`append_row` the columns may grow, so the file is rewritten."""
    table = pd.DataFrame([row])
    if path.exists():
        table = pd.concat([pd.read_csv(path, dtype=str), table.astype(str)], ignore_index=True)
    table.to_csv(path, index=False)


def _run_spec(spec) -> dict[str, object]:
    return spec.run()


def run_grid(specs: list, csv_path: Path, jobs: int, on_row: Callable[[dict], None] | None = None,
             columns: tuple[str, ...] = RESULT_COLUMNS) -> list[str]:
    """Run the specs whose key is not in ``csv_path`` yet, ``jobs`` at a time; append each row as it finishes.

    A spec has ``key()``, ``run()`` (its row) and ``label`` (:class:`RunSpec`; the traffic
    study's ``TrafficSpec``); ``columns`` are the CSV's.

    Returns the error messages of failed runs (those leave no row, so a rerun retries them)."""
    done = done_keys(csv_path)
    todo = [s for s in specs if s.key() not in done]
    log.info("%d runs in the grid, %d already in %s, %d to run", len(specs), len(specs) - len(todo), csv_path, len(todo))
    errors: list[str] = []
    if not todo:
        return errors

    def finish(spec, get: Callable[[], dict]) -> None:
        try:
            row = get()
        except Exception as err:  # a failed run must not stop the others; it is reported and retried next time
            msg = f"{spec.label}: {type(err).__name__}: {err}"
            log.error("run failed: %s", msg)
            errors.append(msg)
            return
        append_row(csv_path, row, columns)
        if on_row is not None:
            on_row(row)

    if jobs <= 1:
        for s in todo:
            finish(s, s.run)
        return errors
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_spec, s): s for s in todo}
        for fut in as_completed(futures):
            finish(futures[fut], fut.result)
    return errors


# ------------------------------------------------------------------ summaries
def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1; NaN for fewer than 2 values) and count of the finite values."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def table_cell(v) -> str:
    """A Markdown table cell: large or whole floats with thousands separators, other floats
    to 4 significant digits, NaN empty, anything else as ``str``."""
    if isinstance(v, float):
        if v != v:
            return ""
        if abs(v) >= 1000 or v.is_integer():
            return f"{v:,.0f}"
        return f"{v:#.4g}".rstrip(".")
    return str(v)


def fmt_pm(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± std"`` (scaled, e.g. to percent); just the mean when the std is undefined."""
    if mean != mean:
        return "–"
    if std != std:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, method, bits): accuracies as mean/std/n over seeds, bytes as means.

    ``ratio`` is the identity (fp16) feature bytes per sample of the same dataset over this
    configuration's; ``wire_ratio`` the same for the whole uplink reply."""
    rows = []
    for (dataset, method, bits), g in df.groupby(["dataset", "method", "bits"], sort=False):
        row: dict[str, object] = {"dataset": dataset, "method": method, "bits": int(bits)}
        for col in ("acc", "acc_perception", "acc_reasoning", *(f"acc_{q}" for q in QTYPES)):
            m, s, n = mean_std(g[col])
            row[f"{col}_mean"], row[f"{col}_std"] = m, s
            if col == "acc":
                row["seeds"] = n
        for col in ("feature_bytes_per_sample", "up_wire_bytes_per_sample", "down_wire_bytes_per_sample",
                    "up_payload_bytes_per_sample", "down_payload_bytes_per_sample", "train_s"):
            row[col] = float(g[col].mean())
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    ident = out[out.method == "identity"].set_index("dataset")
    for col, src in (("ratio", "feature_bytes_per_sample"), ("wire_ratio", "up_wire_bytes_per_sample")):
        out[col] = [
            float(ident.loc[d, src]) / v if d in ident.index and v > 0 else math.nan
            for d, v in zip(out.dataset, out[src])
        ]
    return out


def paired_by_seed(a: pd.Series, b: pd.Series) -> tuple[float, float, int]:
    """``a - b`` (each indexed by seed) over the seeds both have: the mean of the per-seed
    differences, their standard error ``std / sqrt(n)`` (ddof 1; NaN for one pair) and n
    (NaN mean for none)."""
    d = (a - b).dropna()
    if d.empty:
        return math.nan, math.nan, 0
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan, int(len(d))


def paired_difference(runs: pd.DataFrame, a: tuple[str, int], b: tuple[str, int], col: str = "acc",
                      dataset: str | None = None) -> tuple[float, float, int]:
    """Mean and standard error of ``col`` of configuration ``a`` minus ``b`` (each ``(method,
    bits)``), paired by seed over the seeds both have run (per-run rows of a sweep CSV), and the
    number of pairs; NaN s.e. for one pair, NaN mean for none."""
    rows = runs if dataset is None else runs[runs.dataset == dataset]

    def by_seed(m: str, bits: int) -> pd.Series:
        g = rows[(rows.method == m) & (rows.bits == bits)]
        return g.groupby("seed")[col].mean()

    return paired_by_seed(by_seed(*a), by_seed(*b))


def with_paired_columns(summary: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """``summary`` plus, per configuration, its accuracy against identity (fp16) of the same
    dataset paired by seed (``delta_mean``, ``delta_se``, ``pairs``) and the ``retention``:
    mean accuracy over mean identity accuracy on those seeds (Quantized-TinyLLaVA, arXiv
    2511.23402, Tables 3-4, against uncompressed fine-tuning)."""
    out = summary.copy()
    cols: dict[str, list[float]] = {"delta_mean": [], "delta_se": [], "pairs": [], "retention": []}
    for _, r in out.iterrows():
        m, se, n = paired_difference(runs, (r.method, int(r.bits)), ("identity", IDENTITY_BITS), dataset=r.dataset)
        rows = runs[runs.dataset == r.dataset]
        ident = rows[(rows.method == "identity") & (rows.bits == IDENTITY_BITS)].groupby("seed").acc.mean()
        mine = rows[(rows.method == r.method) & (rows.bits == r.bits)].groupby("seed").acc.mean()
        common = mine.index.intersection(ident.index)
        cols["delta_mean"].append(m)
        cols["delta_se"].append(se)
        cols["pairs"].append(n)
        cols["retention"].append(float(mine[common].mean() / ident[common].mean()) if len(common) else math.nan)
    for k, v in cols.items():
        out[k] = v
    return out


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
