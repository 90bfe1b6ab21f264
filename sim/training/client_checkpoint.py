"""A client's own checkpoint: its optimiser state after each round, on its own disk.

The server's checkpoint (``sim/run/checkpoint.py``) holds everything the server knows, but
each client's AdamW moments live only in its Flower ``context.state``, which a
resumed run starts empty. So with ``checkpoint`` on, the final exchange of a round
asks the client to save them (``save-state``), atomically, to::

    <state dir>/<run-name>/partition-<p>/round-<r>.pt      (the two newest are kept)

The state dir is the SuperNode's ``--node-config state-dir=...`` (each hospital keeps
its state on its own machine), else ``<out-dir>/<run-name>/client-state`` (the
simulation, where every client shares the server's disk). After ``--resume`` from
round ``R``, a client with no in-memory state loads its newest file of round ``<= R``:
the state it had when the server's checkpoint was taken.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from sim.config import SplitConfig

from .node import NodeIdentity

KEEP = 2
_FILE = re.compile(r"round-(\d+)\.pt")


def client_state_dir(cfg: SplitConfig, node: NodeIdentity) -> Path:
    if node.state_dir:
        root = Path(node.state_dir).expanduser() / cfg.run_name
    else:
        root = Path(cfg.out_dir).expanduser() / cfg.run_name / "client-state"
    return root / f"partition-{node.partition}"


def save_optimiser_file(cfg: SplitConfig, node: NodeIdentity, rnd: int, flat: dict[str, torch.Tensor]) -> Path:
    """Write ``round-<rnd>.pt`` atomically (temp file, then rename); keep the newest two."""
    d = client_state_dir(cfg, node)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"round-{rnd:06d}.pt"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"round": rnd, "optimiser": flat}, tmp)
    os.replace(tmp, path)
    for old in sorted(_rounds(d))[:-KEEP]:
        (d / f"round-{old:06d}.pt").unlink(missing_ok=True)
    return path


def load_optimiser_file(cfg: SplitConfig, node: NodeIdentity, upto_round: int) -> dict[str, torch.Tensor] | None:
    """The newest saved optimiser state of a round ``<= upto_round`` (None if there is none)."""
    d = client_state_dir(cfg, node)
    rounds = [r for r in _rounds(d) if r <= upto_round] if d.is_dir() else []
    if not rounds:
        return None
    saved = torch.load(d / f"round-{max(rounds):06d}.pt", weights_only=True, map_location="cpu")
    return saved["optimiser"]


def _rounds(d: Path) -> list[int]:
    return [int(m.group(1)) for f in d.iterdir() if (m := _FILE.fullmatch(f.name))]
