"""Where an exchange's time goes (sim/training/timing.py): the client's ``timing-s``, the
server's ``timing.csv``, and the process probe behind the deployment breakdown (P1d)."""

from __future__ import annotations

import threading
import time

import pandas as pd
import psutil
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from sim.run.server_main import run_in_process
from sim.training import timing
from sim.training.timing import COMPONENTS, Arrivals, exchange_timings
from sim.wire.messages import CLIENT_TIMING, TIMING_KEY


def test_start_up_goes_with_the_first_message_of_a_process_only(monkeypatch):
    monkeypatch.setattr(timing, "_STARTUP", timing._Startup())
    assert timing.client_timing(0.5, 1.0) == [0.0] * 5 + [0.5, 1.0]  # no ClientApp module imported: nothing to charge
    timing.mark_clientapp_import(100.0, 101.0, 103.0, 106.0)
    first, second = timing.client_timing(0.5, 1.0), timing.client_timing(0.25, 2.0)
    # not a flwr-clientapp process (pytest): start and load are not this message's
    assert first == [0.0, 0.0, 1.0, 2.0, 3.0, 0.5, 1.0] and len(first) == len(CLIENT_TIMING)
    assert second == [0.0] * 5 + [0.25, 2.0]


def test_the_process_probe_splits_the_time_since_the_process_was_created():
    worker = threading.Thread(target=time.sleep, args=(0.2,))
    worker.start()
    now = time.time()
    start, load = timing.process_start(now)
    worker.join()
    assert start >= 0 and load >= 0
    # psutil's creation time rounds the boot time to the second; /proc ticks are 10 ms
    assert abs((start + load) - (now - psutil.Process().create_time())) < 1.5


def reply(meta: dict, node: int = 7) -> Message:
    req = Message(RecordDict(), dst_node_id=node, message_type="train.split_step")
    return Message(RecordDict({"meta": ConfigRecord(meta)}), reply_to=req)  # from node ``node``


def test_a_rows_components_add_up_to_its_wait_and_bad_reports_count_as_zero():
    good = reply({TIMING_KEY: [0.5, 0.25, 1.0, 0.5, 0.25, 0.5, 2.0]})
    bad = reply({TIMING_KEY: [1.0, float("nan"), 0.0, 0.0, 0.0, 0.0, 0.0]}, node=8)
    rows = exchange_timings(1, 0, "train.split_step", [good, bad], Arrivals(0.1, [(6.0, 0.05), (3.0, 0.05)]), [0, 1])
    a, b = rows
    assert a.last and not b.last and a.exchange_s == b.exchange_s == 6.0
    assert sum(getattr(a, c) for c in COMPONENTS) == pytest.approx(a.wait_s)
    assert a.superlink_s == pytest.approx(0.15) and a.waiting_s == pytest.approx(6.0 - 0.15 - 5.0)
    assert b.start_s == 0 and b.compute_s == 0 and b.waiting_s == pytest.approx(3.0 - 0.15)
    assert exchange_timings(1, 0, "train.split_step", [good], None, [0]) == []  # the transport measured nothing


def test_every_reply_of_a_run_has_a_timing_row(tmp_path, tiny_cfg):
    run_dir = tmp_path / "run"
    run_in_process(tiny_cfg, run_dir, clients=2)
    t = pd.read_csv(run_dir / "timing.csv")
    ledger = pd.read_csv(run_dir / "ledger.csv")
    up = ledger[ledger["direction"] == "up"]
    assert len(t) == len(up) and set(t["kind"]) == set(up["kind"])
    assert (t.groupby(["round", "exchange", "kind"])["last"].sum() == 1).all()
    assert (t[list(COMPONENTS)].sum(axis=1) - t["wait_s"]).abs().max() < 1e-5  # as written, 6 decimals
    # in process: no SuperLink and no process start; the handlers run one after another, so
    # what is left of a reply's wait is the handlers before it and the message handling
    assert (t["superlink_s"] == 0).all() and (t[["start_s", "load_s"]] == 0).all().all()
    assert (t["waiting_s"] >= -1e-5).all() and (t["rebuild_s"] > 0).any()
    assert (t[t["kind"] == "train.split_step"]["compute_s"] > 0).all()
