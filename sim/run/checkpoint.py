"""Per-round server checkpoint, and what ``--resume`` restores from it.

After every round (``checkpoint = true``) the ServerApp writes ``checkpoint.pt`` in
the run directory: first to a temporary file in the same directory, flushed and
fsync'ed, then ``os.replace``'d over the old one, so a crash at any instant leaves
either the previous round's checkpoint or this one, never a torn file. It holds::

    round              the last finished round R
    config             the run config (a resume must use the same)
    server_model       state_dict of the server half: compressor server half + LLM
    server_optimiser   its AdamW state
    client_weights     the global client-side weights after R's FedAvg
    rng                torch, numpy and python RNG states
    ledger             every ledger row so far and the simulated network time (and its uplink and downlink shares)
    metrics_csv/steps_csv   metrics.csv and steps.csv as they were after R
    strategy           the round engine's run-long counters (rejections, drops, bad records)
    elapsed_s          wall time so far

Each client's own optimiser state is checkpointed on the client (``sim/client_state.py``).
On resume, ``ledger.csv``, ``metrics.csv`` and ``steps.csv`` are rewritten from the
checkpoint (rows of the interrupted round are dropped) and training continues with
round R+1, so the finished run's files equal an uninterrupted run's.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


@dataclass
class Checkpoint:
    round: int
    config: dict
    server_model: dict
    server_optimiser: dict
    client_weights: dict[str, torch.Tensor]
    rng: dict
    ledger: list[tuple]
    sim_network_s: float
    metrics_csv: str
    steps_csv: str
    strategy: dict
    elapsed_s: float
    sim_uplink_s: float | None = None  # the ledger's uplink and downlink shares (None: a checkpoint from before
    sim_downlink_s: float | None = None  # they were kept; recomputed from the rows)


def rng_state() -> dict:
    """Every RNG the server process uses, in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically (temporary file, fsync, rename)."""
    path = run_dir / CHECKPOINT
    tmp = run_dir / f".{CHECKPOINT}.tmp{os.getpid()}"
    with tmp.open("wb") as f:
        torch.save(asdict(ckpt), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read ``run_dir/checkpoint.pt`` (tensors and plain data only: ``weights_only``)."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (was the run started with checkpoint=true?)")
    return Checkpoint(**torch.load(path, weights_only=True, map_location="cpu"))  # a GPU run resumes anywhere
