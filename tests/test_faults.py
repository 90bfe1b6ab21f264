"""Client faults: a ClientApp that raises, replies too late, disappears, or sends garbage.

Fast tests run the real ServerApp loop and ClientApp over the in-process LoopbackGrid
(``tests/loopback.py``); the slow one runs the same faults through Flower's Ray
simulation with the ``fault-inject`` knob. Killing a SuperNode of a real deployment is
in tests/test_deployment.py.
"""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SCRATCH, scratch_cfg
from flwr.app import ArrayRecord
from loopback import LoopbackGrid, request_where

from server_app.server_app import run_server
from sim.config import ConfigError, SplitConfig
from sim.config.faults import EVAL, Fault, parse_faults
from sim.model import fold_client_state
from sim.run.checkpoint import load_checkpoint
from sim.training.server import build_server, fedavg, initial_client_weights

ROOT = Path(__file__).resolve().parents[1]
TRAIN = "train.split_step"


def cfg_for(tmp_path: Path, **kw) -> SplitConfig:
    base = dict(
        num_server_rounds=2, local_steps=3, steps_per_exchange=2, batch_size=4, num_samples=160, hidden_size=32,
        image_size=16, patch_size=4, out_dir=str(tmp_path), run_name="run", expected_clients=3,
        exchange_timeout_s=0.5,
    )
    return scratch_cfg(**(base | kw))


def run(cfg: SplitConfig, tmp_path: Path, tamper=None) -> tuple[dict, pd.DataFrame, pd.DataFrame, LoopbackGrid]:
    grid = LoopbackGrid(3, tamper=tamper)
    summary = run_server(grid, cfg, tmp_path / "run")
    return summary, pd.read_csv(tmp_path / "run" / "metrics.csv"), pd.read_csv(tmp_path / "run" / "ledger.csv"), grid


def weights_recorder():
    """A tamper hook that keeps, per round, every client's final weights (and example
    count) and the global weights sent down at exchange 0."""
    finals: dict[int, dict[int, tuple[dict, int]]] = {}
    starts: dict[int, dict] = {}

    def tamper(request, reply):
        kind, rnd, exchange = request_where(request)
        if kind == TRAIN and exchange == 0:
            starts[rnd] = request.content.array_records["weights"].to_torch_state_dict()
        if kind == TRAIN and not reply.has_error() and "weights" in reply.content.array_records:
            meta = reply.content.config_records["meta"]
            finals.setdefault(rnd, {})[meta["partition-id"]] = (
                reply.content.array_records["weights"].to_torch_state_dict(), meta["num-examples"])
        return reply

    return finals, starts, tamper


# ----------------------------------------------------------------------------- the knob
def test_fault_spec_parses_and_bad_specs_name_the_key():
    assert parse_faults("raise@1:2:3; delay@0:1:eval:4.5") == (
        Fault("raise", 1, 2, 3), Fault("delay", 0, 1, EVAL, 4.5))
    assert parse_faults("") == ()
    for bad in ("explode@1:1:1", "raise@1:1", "delay@1:1:1", "raise@1:0:1", "raise@a:1:1", "raise@1:1:1:5"):
        with pytest.raises(ConfigError, match="fault-inject"):
            SplitConfig(fault_inject=bad)
    assert SplitConfig().fault_inject == ""  # off by default


# ----------------------------------------------------------------------------- raises
def test_client_that_raises_is_dropped_and_left_out_of_fedavg(tmp_path):
    finals, starts, tamper = weights_recorder()
    cfg = cfg_for(tmp_path, fault_inject="raise@1:1:1")
    summary, metrics, ledger, _ = run(cfg, tmp_path, tamper)

    r1 = metrics.iloc[0]
    assert r1["clients"] == 3 and r1["dropped"].startswith("1:exchange 1: error reply:") and "InjectedFault" in r1["dropped"]
    assert pd.isna(metrics.iloc[1]["dropped"])  # nobody dropped in round 2
    # round 2 starts from exactly the FedAvg of the two clients that finished round 1
    assert sorted(finals[1]) == [0, 2]
    avg = fedavg([finals[1][p][0] for p in (0, 2)], [finals[1][p][1] for p in (0, 2)])
    want = fold_client_state(build_server(cfg).model.specs(), avg)
    assert set(starts[2]) == set(want) and all(torch.equal(starts[2][k], want[k]) for k in want)
    assert sorted(finals[2]) == [0, 1, 2]  # partition 1 is back in round 2
    # the ledger keeps what partition 1 sent (exchange 0) and was sent (exchanges 0 and 1), nothing after
    p1 = ledger[(ledger["round"] == 1) & (ledger["partition"] == 1) & (ledger["kind"] == TRAIN)]
    assert list(zip(p1["exchange"], p1["direction"])) == [(0, "down"), (0, "up"), (1, "down")]
    assert summary["dropped_clients"] == 1 and summary["rejected_messages"] == 0


# ----------------------------------------------------------------------------- no reply
def test_client_that_misses_the_deadline_is_dropped_and_not_asked_to_evaluate(tmp_path, caplog):
    def late(request, reply):  # partition 2's reply to round 1, exchange 1 never arrives in time
        if request_where(request) == (TRAIN, 1, 1) and request.metadata.dst_node_id == 1002:
            return None
        return reply

    finals, _, record = weights_recorder()
    summary, metrics, ledger, _ = run(cfg_for(tmp_path), tmp_path, lambda q, r: late(q, record(q, r)))
    assert metrics.iloc[0]["dropped"] == "2:exchange 1: no reply by the deadline"
    assert sorted(finals[1]) == [0, 1] and sorted(finals[2]) == [0, 1, 2]
    eval1 = ledger[(ledger["round"] == 1) & (ledger["kind"] == "evaluate.split_infer") & (ledger["direction"] == "down")]
    assert sorted(eval1["partition"]) == [0, 1]
    assert metrics.iloc[1]["clients"] == 3


def test_client_that_disappears_mid_round_is_not_sampled_again(tmp_path, caplog):
    grid_ref = {}

    def vanish(request, reply):
        if request_where(request) == (TRAIN, 1, 1) and request.metadata.dst_node_id == 1001:
            grid_ref["grid"].gone.add(1001)  # the SuperNode died: no reply, and it is no longer listed
            return None
        return reply

    cfg = cfg_for(tmp_path, num_server_rounds=3)
    grid = LoopbackGrid(3, tamper=vanish)
    grid_ref["grid"] = grid
    with caplog.at_level(logging.INFO):
        summary = run_server(grid, cfg, tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["clients"].tolist() == [3, 2, 2]
    assert metrics.iloc[0]["dropped"] == "1:exchange 1: no reply by the deadline"
    assert "gone: [1]" in caplog.text
    assert summary["rounds"] == 3 and np.isfinite(summary["accuracy"])


# ----------------------------------------------------------------------------- too few clients
def test_round_below_min_train_clients_keeps_the_global_weights(tmp_path, caplog):
    cfg = cfg_for(tmp_path, num_server_rounds=1, min_train_clients=3, fault_inject="raise@0:1:0")
    with caplog.at_level(logging.WARNING):
        _, metrics, ledger, _ = run(cfg, tmp_path)
    assert "round 1 stopped at exchange 0: 2 live clients < min-train-clients 3" in caplog.text
    got = load_checkpoint(tmp_path / "run").client_weights
    init = initial_client_weights(cfg)
    assert all(torch.equal(got[k], init[k]) for k in init)  # no FedAvg happened
    assert set(ledger[ledger["kind"] == TRAIN]["exchange"]) == {0}


def test_round_is_skipped_when_too_few_clients_are_live(tmp_path, caplog):
    cfg = cfg_for(tmp_path, num_server_rounds=1, min_train_clients=4, expected_clients=3)
    with caplog.at_level(logging.WARNING):
        _, metrics, ledger, _ = run(cfg, tmp_path)
    assert "round 1 skipped: 3 clients sampled of 3 live, min-train-clients is 4" in caplog.text
    assert (ledger["kind"] == TRAIN).sum() == 0 and metrics.iloc[0]["dropped"].count("too few clients") == 3


# ----------------------------------------------------------------------------- garbage and replays
def test_invalid_and_repeated_replies_are_rejected_counted_and_survived(tmp_path):
    def garble(request, reply):
        where = request_where(request)
        node = request.metadata.dst_node_id
        if where == (TRAIN, 1, 2) and node == 1000:  # NaN in the returned weights
            w = reply.content.array_records["weights"].to_torch_state_dict()
            w[next(iter(w))].view(-1)[0] = float("nan")
            reply.content["weights"] = ArrayRecord.from_torch_state_dict(w)
        if where == (TRAIN, 2, 1) and node == 1001:  # replayed: the reply claims an older exchange
            reply.content.config_records["meta"]["exchange"] = 0
        if where == (TRAIN, 1, 0) and node == 1002:  # the same reply twice
            return [reply, reply]
        return reply

    summary, metrics, ledger, _ = run(cfg_for(tmp_path), tmp_path, garble)
    assert metrics["rejected"].tolist() == [2, 1]  # round 1: the NaN weights and the second copy
    dropped = [dict(d.split(":", 1) for d in str(row).split(";")) for row in metrics["dropped"]]
    assert set(dropped[0]) == {"0"} and "NaN" in dropped[0]["0"]  # the duplicate costs partition 2 nothing
    assert set(dropped[1]) == {"1"} and "replayed" in dropped[1]["1"]
    dup = ledger[(ledger["round"] == 1) & (ledger["exchange"] == 0) & (ledger["partition"] == 2) & (ledger["direction"] == "up")]
    assert len(dup) == 2  # both copies arrived, so both are in the ledger
    assert summary["rejected_messages"] == 3 and summary["rounds"] == 2


# ----------------------------------------------------------------------------- through Flower's simulation
@pytest.mark.slow
def test_faults_through_the_ray_simulation(tmp_path):
    """``raise`` becomes an error reply, ``delay`` past the timeout a missing one."""
    out = tmp_path / "run"
    overrides = {
        **SCRATCH, "num-server-rounds": 2, "local-steps": 2, "steps-per-exchange": 1, "batch-size": 4, "num-samples": 160,
        "hidden-size": 32, "image-size": 16, "patch-size": 4, "exchange-timeout-s": 10,
        "fault-inject": "raise@1:1:1;delay@2:1:1:25",
    }
    cmd = [sys.executable, "-m", "sim", "run", "--clients", "3", "--out", str(out)]
    cmd += [a for k, v in overrides.items() for a in ("-c", f"{k}={v}")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = pd.read_csv(out / "metrics.csv")
    dropped = metrics.iloc[0]["dropped"]
    assert "1:exchange 1: error reply:" in dropped and "InjectedFault" in dropped
    assert "2:exchange 1: no reply by the deadline" in dropped
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
