"""The `flwr run` path: a local SuperLink, two simulated SuperNodes, the real CLI."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import SCRATCH

ROOT = Path(__file__).resolve().parents[1]


def _toml(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else f"'{v}'" if isinstance(v, str) else str(v)


@pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flwr CLI not installed")
def test_flwr_run_trains_and_writes_the_run_directory(tmp_path):
    over = {**SCRATCH, "out-dir": str(tmp_path), "run-name": "flwr", "num-server-rounds": 1, "local-steps": 2,
            "steps-per-exchange": 1, "batch-size": 4, "num-samples": 120, "hidden-size": 32, "image-size": 16}
    run_config = " ".join(f"{k}={_toml(v)}" for k, v in over.items())
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "flwr_run_local.sh"), "2", run_config],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "STARTUP_TIMEOUT": "120"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "flwr" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["clients"] == 2 and summary["uplink_bytes"] > 0
