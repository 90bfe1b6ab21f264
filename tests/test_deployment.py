"""Flower's deployment runtime on loopback: a TLS SuperLink with SuperNode authentication,
three SuperNodes (``--node-config "partition-id=i num-partitions=3"``), ``flwr run`` with
runtime dependency installation disabled (``sim/deploy.py``).

The smoke test (default suite) checks that plain HTTP and an unregistered SuperNode are
refused, and that a one-round run finishes with the same losses, accuracy and bytes
as ``python -m sim run`` on the Ray simulation for the same config. The slow tests kill
one SuperNode's whole process group mid-round, kill a site's warm worker mid-run (its
ClientApps take over), and kill the ServerApp after round 1 and resume the run with
``flwr run --run-config 'resume=true ...'``. Every LocalDeployment here runs with site
workers (its default), so the smoke test's equality is the worker's.
"""

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import SCRATCH
from test_resume import assert_same_run

from sim.run.checkpoint import CHECKPOINT, load_checkpoint
from sim.run.deploy import LocalDeployment

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    **SCRATCH,
    "num-server-rounds": 1, "local-steps": 2, "steps-per-exchange": 2, "batch-size": 4, "num-samples": 120,
    "hidden-size": 32, "image-size": 16, "patch-size": 4, "seed": 3, "checkpoint": False,
}

pytestmark = pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="Flower CLI not installed")


def simulate(out: Path, clients: int, cfg: dict) -> None:
    cmd = [sys.executable, "-m", "sim", "run", "--clients", str(clients), "--out", str(out)]
    cmd += [a for k, v in cfg.items() for a in ("-c", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_deployment_with_tls_matches_the_simulation(tmp_path):
    t0 = time.monotonic()
    # equal-length run names: the name travels in the config record, so it counts in the bytes
    cfg = SMALL | {"out-dir": str(tmp_path), "run-name": "dep", "expected-clients": 3}
    with LocalDeployment(tmp_path / "deployment", 3, tls=True, authenticate=True) as dep:
        with pytest.raises(OSError):  # the SuperLink speaks TLS only
            urllib.request.urlopen(f"http://127.0.0.1:{dep.port}/health", timeout=5)
        dep.start_supernode(3, register=False)  # a SuperNode whose key was never registered
        outcome = dep.run(cfg)
        intruder = dep.procs["supernode-3"]
        assert intruder.wait(60) != 0
        assert "Failed to activate SuperNode" in (dep.logs / "supernode-3.log").read_text()
        assert dep.online_nodes() == 3
    assert outcome.ok, f"{outcome.status}\n{outcome.output[-3000:]}"
    deploy_s = time.monotonic() - t0
    simulate(tmp_path / "sim", 3, SMALL)

    dep_dir, sim_dir = tmp_path / "dep", tmp_path / "sim"
    steps_d, steps_s = pd.read_csv(dep_dir / "steps.csv"), pd.read_csv(sim_dir / "steps.csv")
    assert len(steps_d) == SMALL["local-steps"]
    assert (steps_d["loss"] - steps_s["loss"]).abs().max() <= 1e-5
    m_d, m_s = pd.read_csv(dep_dir / "metrics.csv"), pd.read_csv(sim_dir / "metrics.csv")
    for col in ("accuracy", "clients", "samples", "rejected", "exchanges"):
        assert m_d[col].tolist() == m_s[col].tolist(), col
    assert m_d["dropped"].isna().all()
    # same messages with the same content; wire bytes differ only by the framing of
    # node ids and message ids, a few bytes per message
    order = ["round", "exchange", "partition", "direction", "kind", "payload_bytes"]
    led_d, led_s = (pd.read_csv(d / "ledger.csv").sort_values(order).reset_index(drop=True) for d in (dep_dir, sim_dir))
    assert len(led_d) == len(led_s)
    cols = order + ["samples", "feature_bytes"]
    pd.testing.assert_frame_equal(led_d[cols], led_s[cols])
    assert ((led_d["wire_bytes"] - led_s["wire_bytes"]).abs() <= 64).all()
    summary = json.loads((dep_dir / "summary.json").read_text())
    assert summary["clients"] == 3 and summary["rejected_messages"] == 0
    print(f"deployment run (start-up included): {deploy_s:.1f} s")


def wait_for_reply(runner, outcome: dict, ledger: Path, partition: int, what: str) -> None:
    """Until ``partition`` has answered exchange 0 of round 1 (the run must still be going)."""
    deadline = time.monotonic() + 600
    while True:
        if not runner.is_alive():
            run = outcome.get("run")
            pytest.fail(f"the run ended before {what}: {run.status if run else '?'}\n{run.output[-3000:] if run else ''}")
        assert time.monotonic() < deadline, f"partition {partition} never answered exchange 0"
        if ledger.is_file():
            led = pd.read_csv(ledger)
            if ((led["kind"] == "train.split_step") & (led["partition"] == partition) & (led["direction"] == "up")).any():
                return
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_site_worker_changes_nothing_but_speed(tmp_path):
    """A site's warm worker (sim/training/site_worker.py) killed mid-run: that SuperNode's
    ClientApps handle its messages themselves from then on; no client is dropped and the
    losses equal the simulation's."""
    cfg = {**SMALL, "num-server-rounds": 2, "local-steps": 4}
    with LocalDeployment(tmp_path / "deployment", 2, tls=False, authenticate=False) as dep:
        outcome = {}
        run_cfg = cfg | {"out-dir": str(tmp_path), "run-name": "dep", "expected-clients": 2}
        runner = threading.Thread(target=lambda: outcome.setdefault("run", dep.run(run_cfg)))
        runner.start()
        wait_for_reply(runner, outcome, tmp_path / "dep" / "ledger.csv", 0, "the kill")
        dep.kill_worker(0)
        runner.join(900)
        clientapp_log = (dep.logs / "supernode-0.log").read_text()
    assert outcome["run"].ok, outcome["run"].output[-3000:]
    assert "site worker not used" in clientapp_log  # node 0 fell back
    simulate(tmp_path / "sim", 2, cfg)
    steps_d, steps_s = pd.read_csv(tmp_path / "dep" / "steps.csv"), pd.read_csv(tmp_path / "sim" / "steps.csv")
    assert len(steps_d) == 2 * cfg["local-steps"]
    assert (steps_d["loss"] - steps_s["loss"]).abs().max() <= 1e-5
    metrics = pd.read_csv(tmp_path / "dep" / "metrics.csv")
    assert metrics["dropped"].isna().all() and metrics["clients"].tolist() == [2, 2]
    timing = pd.read_csv(tmp_path / "dep" / "timing.csv")
    train = timing[timing["kind"] == "train.split_step"]
    assert (train[train["partition"] == 1]["import_torch_s"] == 0).all()  # node 1 kept its worker
    assert (train[(train["partition"] == 0) & (train["round"] == 2)]["import_torch_s"] > 0).all()


@pytest.mark.slow
def test_killed_supernode_is_dropped_and_the_round_completes(tmp_path):
    # every deployment message starts a fresh ClientApp process (imports included): the
    # deadline must cover that on a busy 2-core machine, and it is also how long the
    # server waits for the killed node
    cfg = SMALL | {"out-dir": str(tmp_path), "run-name": "kill", "expected-clients": 3, "exchange-timeout-s": 90}
    with LocalDeployment(tmp_path / "deployment", 3) as dep:
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.setdefault("run", dep.run(cfg)))
        runner.start()
        wait_for_reply(runner, outcome, tmp_path / "kill" / "ledger.csv", 2, "the kill")
        dep.kill_supernode(2)
        runner.join(900)
    assert outcome["run"].ok, outcome["run"].output[-3000:]
    metrics = pd.read_csv(tmp_path / "kill" / "metrics.csv")
    dropped = metrics.iloc[0]["dropped"]
    assert dropped.startswith("2:exchange 1:"), dropped  # no reply by the deadline, or the SuperLink's offline error
    assert metrics.iloc[0]["clients"] == 3 and metrics.iloc[0]["samples"] == 3 * 2 * 4  # exchange 0 had all three
    led = pd.read_csv(tmp_path / "kill" / "ledger.csv")
    sent_to_2 = led[(led["partition"] == 2) & (led["kind"] == "train.split_step")]
    assert list(zip(sent_to_2["exchange"], sent_to_2["direction"])) == [(0, "down"), (0, "up"), (1, "down")]
    summary = json.loads((tmp_path / "kill" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["dropped_clients"] >= 1


@pytest.mark.slow
def test_killed_serverapp_resumes_to_the_uninterrupted_result(tmp_path):
    """A 2-round deployment run whose ServerApp process is SIGKILLed after round 1, then
    submitted again with ``resume=true``, ends with the steps, metrics and messages of an
    uninterrupted run on the same SuperNodes, which reload their optimiser state from their
    ``state-dir``."""
    t0 = time.monotonic()
    cfg = SMALL | {"out-dir": str(tmp_path), "expected-clients": 2, "num-server-rounds": 2, "checkpoint": True}
    sites = [{"state-dir": str(tmp_path / f"site-{i}")} for i in range(2)]
    straight, killed = tmp_path / "run-a", tmp_path / "run-b"  # equal-length names (they travel in the config)
    with LocalDeployment(tmp_path / "deployment", 2, tls=False, authenticate=False, node_configs=sites) as dep:
        first = dep.run(cfg | {"run-name": "run-a"})
        assert first.ok, f"{first.status}\n{first.output[-3000:]}"
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.setdefault("run", dep.run(cfg | {"run-name": "run-b"})))
        runner.start()
        deadline = time.monotonic() + 600
        while not (killed / CHECKPOINT).exists():  # round 1 finished and was saved
            assert runner.is_alive() and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        assert dep.kill_serverapp() == 1
        runner.join(300)
        assert not runner.is_alive() and not outcome["run"].ok
        assert load_checkpoint(killed).round == 1 and not (killed / "summary.json").exists()
        resumed = dep.run(cfg | {"run-name": "run-b", "resume": True})
        assert resumed.ok, f"{resumed.status}\n{resumed.output[-3000:]}"
    assert json.loads((killed / "summary.json").read_text())["resumed_from"] == 1
    assert not (killed / "client-state").exists()  # the sites kept their state on their side
    assert (tmp_path / "site-1" / "run-b" / "partition-1" / "round-000002.pt").is_file()
    assert_same_run(straight, killed, resumed_after=1, wire_slack=4)  # run ids are framed with varying lengths
    print(f"deployment kill and resume: {time.monotonic() - t0:.1f} s")
