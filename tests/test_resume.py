"""Checkpoint and resume: an interrupted run, resumed, ends exactly like an uninterrupted one.

Fast variant: the real ServerApp loop (``run_server``) and ClientApp over the in-process
``LoopbackGrid``; the "crash" is an exception raised when round 2 starts, after round
1's checkpoint, and the resumed run gets fresh client contexts (as new SuperNodes
would). The same through the ``flwr run`` entry (config from ``context.run_config``,
``resume=true``; the deployment's path) with each site's state in its ``state-dir``.
Slow variant: ``python -m sim run`` on Ray, killed with SIGKILL after round 1, then
``python -m sim run --resume DIR``; a killed deployment run is in tests/test_deployment.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import SCRATCH, scratch_cfg
from loopback import LoopbackGrid, request_where

from flwr.app import Context, RecordDict

from server_app.server_app import main as flwr_run_main
from server_app.server_app import run_server
from sim.config import ConfigError, SplitConfig
from sim.run.checkpoint import CHECKPOINT, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMING = ["wall_s", "train_s", "runtime_s", "client_compute_s", "compute_s"]  # wall-clock columns differ run to run


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


def small_cfg(out: Path, name: str, **kw) -> SplitConfig:
    base = dict(
        num_server_rounds=3, local_steps=3, steps_per_exchange=2, batch_size=4, num_samples=160, hidden_size=32,
        image_size=16, patch_size=4, warmup_steps=2, out_dir=str(out), run_name=name, expected_clients=3,
        exchange_timeout_s=5.0,
    )
    return scratch_cfg(**(base | kw))


def crash_at_round(rnd: int):
    def tamper(request, reply):
        if request_where(request)[1:] == (rnd, 0):
            raise Crash
        return reply

    return tamper


def assert_same_run(a: Path, b: Path, resumed_after: int, wire_slack: int = 0) -> None:
    """``b`` (resumed after round ``resumed_after``) trained exactly like ``a``.

    The only difference allowed is real traffic: the resumed ServerApp does not know
    the (new) nodes, so its first round opens with a ``query.hello`` exchange; those
    ledger rows, and their bytes in that round's totals, are the cost of resuming.
    ``wire_slack``: bytes a message's framing may differ by (random node ids are
    varint-encoded, so a new simulation's messages can be a byte longer or shorter)."""
    steps_a, steps_b = pd.read_csv(a / "steps.csv"), pd.read_csv(b / "steps.csv")
    pd.testing.assert_frame_equal(steps_a, steps_b)  # every server loss (as written, 9 significant digits)
    # node ids are drawn afresh by each simulation (the loopback grid keeps them): compare
    # the messages by round, exchange, partition and content
    order = ["round", "exchange", "direction", "partition", "kind", "payload_bytes"]
    led_a, led_b = (pd.read_csv(d / "ledger.csv").drop(columns="node") for d in (a, b))
    rehello = (led_b["round"] == resumed_after + 1) & (led_b["kind"] == "query.hello")
    assert rehello.sum() == (led_a["kind"] == "query.hello").sum()  # a request and a reply per node, as in round 1
    led_a, kept = (x.sort_values(order).reset_index(drop=True) for x in (led_a, led_b[~rehello]))
    assert ((led_a["wire_bytes"] - kept["wire_bytes"]).abs() <= wire_slack).all()
    pd.testing.assert_frame_equal(led_a.drop(columns="wire_bytes"), kept.drop(columns="wire_bytes"))
    hello_bytes = led_b[rehello].groupby("direction")["wire_bytes"].sum()
    m_a, m_b = (pd.read_csv(d / "metrics.csv").drop(columns=TIMING) for d in (a, b))
    row = m_b["round"] == resumed_after + 1
    m_b.loc[row, "uplink_bytes"] -= hello_bytes["up"]
    m_b.loc[row, "downlink_bytes"] -= hello_bytes["down"]
    for col in ("uplink_bytes", "downlink_bytes"):
        assert ((m_a[col] - m_b[col]).abs() <= wire_slack * len(led_a)).all(), col
    wire = ["sim_network_s", "sim_uplink_s", "sim_downlink_s", "uplink_bytes", "downlink_bytes"]  # the hello exchange
    pd.testing.assert_frame_equal(m_a.drop(columns=wire), m_b.drop(columns=wire))
    s_a, s_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("accuracy", "best_accuracy", "rounds", "samples_seen", "uplink_payload_bytes_per_sample"):
        assert s_a[key] == s_b[key], key
    assert abs(s_a["uplink_bytes_per_sample"] - s_b["uplink_bytes_per_sample"]) <= wire_slack
    assert abs(s_b["uplink_bytes"] - s_a["uplink_bytes"] - hello_bytes["up"]) <= wire_slack * len(led_a)
    assert s_b["messages"] - s_a["messages"] == rehello.sum()


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # equal-length run names: the name travels in the config record, so it counts in the bytes
    straight, resumed = tmp_path / "run-a", tmp_path / "run-b"
    run_server(LoopbackGrid(3), small_cfg(tmp_path, "run-a"), straight)

    cfg = small_cfg(tmp_path, "run-b")
    with pytest.raises(Crash):
        run_server(LoopbackGrid(3, tamper=crash_at_round(2)), cfg, resumed)
    ckpt = load_checkpoint(resumed)
    assert ckpt.round == 1 and not (resumed / "summary.json").exists()
    assert len(pd.read_csv(resumed / "metrics.csv")) == 1
    summary = run_server(LoopbackGrid(3), cfg.replace(resume=True), resumed)
    assert summary["resumed_from"] == 1
    assert_same_run(straight, resumed, resumed_after=1)


def test_flwr_run_entry_resumes_with_the_run_config_key_and_the_sites_state_dirs(tmp_path):
    """What ``flwr run --run-config 'resume=true ...'`` does on a deployment: the ServerApp
    reads ``resume`` from its run config, and sites with a ``state-dir`` reload their
    optimiser state from there (a lost state would change every later step)."""
    straight, resumed = tmp_path / "run-a", tmp_path / "run-b"
    run_server(LoopbackGrid(3), small_cfg(tmp_path, "run-a"), straight)
    sites = [{"state-dir": str(tmp_path / f"site-{i}")} for i in range(3)]

    def flwr_run(grid: LoopbackGrid, **over) -> None:
        run_config = small_cfg(tmp_path, "run-b").to_run_config() | over  # what Flower hands the ServerApp
        flwr_run_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))

    with pytest.raises(Crash):
        flwr_run(LoopbackGrid(3, sites, tamper=crash_at_round(2)))
    flwr_run(LoopbackGrid(3, sites), resume=True)
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == 1
    assert json.loads((resumed / "config.json").read_text())["resume"] is False  # the run's files: as uninterrupted
    assert load_checkpoint(resumed).config["resume"] is False
    assert not (resumed / "client-state").exists()
    for i in range(3):
        assert (tmp_path / f"site-{i}" / "run-b" / f"partition-{i}" / "round-000003.pt").is_file()
    assert_same_run(straight, resumed, resumed_after=1)


def test_resume_needs_a_run_name(tmp_path):
    with pytest.raises(ConfigError, match="'resume'.*run-name"):
        small_cfg(tmp_path, "", resume=True)


def test_resumed_run_with_error_feedback_equals_uninterrupted_run(tmp_path):
    """grad-error-feedback keeps residuals on the server, and every round starts without
    them, so the checkpoint needs none: a resumed run still ends like an uninterrupted one."""
    kw = dict(grad_compressor="stochastic", grad_bits=2, grad_error_feedback=True, local_steps=4)
    straight, resumed = tmp_path / "run-a", tmp_path / "run-b"
    run_server(LoopbackGrid(3), small_cfg(tmp_path, "run-a", **kw), straight)
    cfg = small_cfg(tmp_path, "run-b", **kw)
    with pytest.raises(Crash):
        run_server(LoopbackGrid(3, tamper=crash_at_round(2)), cfg, resumed)
    run_server(LoopbackGrid(3), cfg.replace(resume=True), resumed)
    assert_same_run(straight, resumed, resumed_after=1)


def test_checkpoint_holds_every_piece_and_is_written_atomically(tmp_path):
    cfg = small_cfg(tmp_path, "r", num_server_rounds=1)
    run_server(LoopbackGrid(3), cfg, tmp_path / "r")
    ckpt = load_checkpoint(tmp_path / "r")
    assert ckpt.round == 1 and ckpt.config["run-name"] == "r"
    assert any("llm" in k for k in ckpt.server_model) and ckpt.server_optimiser["state"]
    assert ckpt.client_weights and all(torch.isfinite(v).all() for v in ckpt.client_weights.values() if v.is_floating_point())
    assert set(ckpt.rng) == {"torch", "numpy", "python"}
    assert len(ckpt.ledger) == len(pd.read_csv(tmp_path / "r" / "ledger.csv"))
    assert ckpt.metrics_csv == (tmp_path / "r" / "metrics.csv").read_text()
    assert [p.name for p in (tmp_path / "r").iterdir() if "tmp" in p.name] == []  # temp files were renamed
    for p in range(3):  # every client saved its optimiser state for round 1, on its side
        assert (tmp_path / "r" / "client-state" / f"partition-{p}" / "round-000001.pt").is_file()


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tmp_path):
    cfg = small_cfg(tmp_path, "r")
    with pytest.raises(Crash):
        run_server(LoopbackGrid(3, tamper=crash_at_round(2)), cfg, tmp_path / "r")
    with pytest.raises(ConfigError, match="lr"):
        run_server(LoopbackGrid(3), cfg.replace(lr=0.01, resume=True), tmp_path / "r")
    with pytest.raises(FileNotFoundError, match=CHECKPOINT):
        run_server(LoopbackGrid(3), small_cfg(tmp_path, "none", resume=True), tmp_path / "none")


# ----------------------------------------------------------------------------- the real kill
SMALL = {
    **SCRATCH,
    "num-server-rounds": 3, "local-steps": 3, "steps-per-exchange": 2, "batch-size": 4, "num-samples": 160,
    "hidden-size": 32, "image-size": 16, "patch-size": 4, "warmup-steps": 2,
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sim", "run", *args]


def _overrides() -> list[str]:
    return [a for k, v in SMALL.items() for a in ("-c", f"{k}={v}")]


@pytest.mark.slow
def test_killed_simulation_resumes_to_the_same_result(tmp_path):
    straight = tmp_path / "run-a"  # equal-length names: the name travels in the config record
    proc = subprocess.run(_cli("--clients", "2", "--out", str(straight), *_overrides()), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "run-b"
    victim = subprocess.Popen(_cli("--clients", "2", "--out", str(killed), *_overrides()), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not (killed / CHECKPOINT).exists():  # round 1 finished and was saved
            assert victim.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)  # the driver and every Ray process it started
        victim.wait()
    assert not (killed / "summary.json").exists()
    rounds_done = load_checkpoint(killed).round
    assert 1 <= rounds_done < SMALL["num-server-rounds"]

    proc = subprocess.run(_cli("--resume", str(killed)), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((killed / "summary.json").read_text())["resumed_from"] == rounds_done
    assert_same_run(straight, killed, resumed_after=rounds_done, wire_slack=2)
