"""Shared fixtures: a tiny config that trains in seconds, and one small run of each runtime.

The small configs train tiny models from scratch: they start from :data:`SCRATCH`, not from
the project's default job (the shipped checkpoint on pathology, ``sim/config/keys.py``)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sim.config import FROM_SCRATCH, SplitConfig

torch.set_num_threads(1)

# The from-scratch regime: init=scratch, dataset=synthetic, stage=finetune and the old
# rounds/steps/exchange/warm-up/align-batch/rdfsq-send-range values, under every small config.
SCRATCH: dict[str, object] = dict(FROM_SCRATCH)


def scratch_cfg(**kw) -> SplitConfig:
    """A from-scratch config (:data:`SCRATCH`) with the snake_case fields ``kw`` changed."""
    return SplitConfig.from_run_config(SCRATCH).replace(**kw)


@pytest.fixture
def tiny_cfg(tmp_path) -> SplitConfig:
    return scratch_cfg(
        num_server_rounds=1, local_steps=2, steps_per_exchange=1, batch_size=4, num_samples=120,
        hidden_size=32, image_size=16, patch_size=4, out_dir=str(tmp_path), run_name="run",
    )


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside a Flower run need a task identity (the runtime sets one)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    **SCRATCH,
    "num-server-rounds": 2, "local-steps": 3, "steps-per-exchange": 2, "batch-size": 4, "num-samples": 160,
    "hidden-size": 32, "image-size": 16, "patch-size": 4,
}


def run_cli(out: Path, clients: int, overrides: dict, *extra: str) -> subprocess.CompletedProcess:
    """``python -m sim run`` with ``-c`` overrides (and ``extra`` arguments) into ``out``."""
    cmd = [sys.executable, "-m", "sim", "run", "--clients", str(clients), "--out", str(out), *extra]
    for k, v in overrides.items():
        cmd += ["-c", f"{k}={v}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def sim_run(tmp_path_factory):
    """The SMALL config through Flower's Ray simulation, 2 clients."""
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = run_cli(out, 2, SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def in_process_run(tmp_path_factory):
    """The same, with ``--in-process``."""
    out = tmp_path_factory.mktemp("inproc") / "run"
    proc = run_cli(out, 2, SMALL, "--in-process")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
