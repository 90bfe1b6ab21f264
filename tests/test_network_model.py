"""The network model (sim/wire/ledger.py): separate uplink and downlink bandwidths, the
split of the simulated time into compute, uplink and downlink, and time-to-accuracy
(sim/run/results.py); that the defaults reproduce the old single-bandwidth numbers."""

import json
import math

import pandas as pd
import pytest

from sim.config import ConfigError
from sim.run.results import METRIC_COLUMNS, time_to_accuracy
from sim.run.server_main import run_in_process
from sim.wire.ledger import Ledger, LedgerRow, NetworkModel, exchanges_of, network_seconds_per_round

from conftest import scratch_cfg


def row(rnd, exchange, node, direction, nbytes, kind="train.split_step"):
    return LedgerRow(rnd, exchange, node, node, direction, kind, nbytes, nbytes)


def old_client_seconds(bandwidth_mbps, rtt_ms, wire_bytes):
    """The formula before the directions were split: rtt + all bytes over one bandwidth."""
    return rtt_ms / 1000.0 + wire_bytes * 8 / (bandwidth_mbps * 1e6)


def test_the_config_keys_default_to_the_shorthand():
    cfg = scratch_cfg()
    assert cfg.uplink_mbps == 0 and cfg.downlink_mbps == 0
    net = NetworkModel.from_config(cfg)
    assert net.up_mbps == net.down_mbps == cfg.bandwidth_mbps
    net = NetworkModel.from_config(scratch_cfg(uplink_mbps=2.0, downlink_mbps=50.0))
    assert (net.up_mbps, net.down_mbps) == (2.0, 50.0)
    with pytest.raises(ConfigError, match="uplink-mbps"):
        scratch_cfg(uplink_mbps=-1.0)


@pytest.mark.parametrize("down,up", [(0, 0), (1, 2), (123_457, 98_765), (10**9, 3)])
def test_a_symmetric_link_gives_exactly_the_old_formula(down, up):
    net = NetworkModel(10.0, 20.0)
    total, down_s, up_s = net.client_split(down, up)
    assert total == old_client_seconds(10.0, 20.0, down + up)  # bitwise: existing results do not move
    assert math.isclose(down_s + up_s, total, rel_tol=1e-12)
    assert math.isclose(down_s, 0.01 + down * 8 / 1e7) and math.isclose(up_s, 0.01 + up * 8 / 1e7)


def test_separate_bandwidths_charge_each_direction_its_own():
    net = NetworkModel(10.0, 40.0, uplink_mbps=1.0, downlink_mbps=100.0)
    total, down_s, up_s = net.client_split(1_000_000, 250_000)
    assert down_s == pytest.approx(0.02 + 8e6 / 1e8) and up_s == pytest.approx(0.02 + 2e6 / 1e6)
    assert total == pytest.approx(down_s + up_s)


def test_an_exchange_takes_its_slowest_client_and_its_split():
    net = NetworkModel(10.0, 0.0, uplink_mbps=1.0, downlink_mbps=10.0)
    rows = [row(1, 0, 1, "down", 10_000_000), row(1, 0, 2, "down", 1_000), row(1, 0, 1, "up", 1_000),
            row(1, 0, 2, "up", 2_000_000)]
    ledger = Ledger(net)
    seconds = ledger.record_exchange(rows)
    # node 1: 8 s down + 0.008 s up; node 2: 0.0008 s down + 16 s up -> node 2
    assert seconds == pytest.approx(16.0008)
    assert ledger.sim_downlink_s == pytest.approx(0.0008) and ledger.sim_uplink_s == pytest.approx(16.0)
    restored = Ledger(net)
    restored.restore(ledger.rows, ledger.sim_network_s)  # an old checkpoint: the split is recomputed
    assert (restored.sim_uplink_s, restored.sim_downlink_s) == (ledger.sim_uplink_s, ledger.sim_downlink_s)


def test_exchanges_are_regrouped_from_the_rows():
    rows = [row(1, -1, 1, "down", 5, "query.hello"), row(1, -1, 1, "up", 5, "query.hello"), row(1, 0, 1, "down", 7),
            row(1, 0, 1, "up", 9), row(1, 1, 1, "down", 3), row(1, 1, 1, "up", 1, "evaluate.split_infer")]
    groups = exchanges_of(rows)
    assert [len(g) for _, g in groups] == [2, 2, 1, 1]
    net = NetworkModel(1.0, 10.0)
    assert network_seconds_per_round(rows, net)[1] == pytest.approx(4 * 0.01 + (5 + 5 + 7 + 9 + 3 + 1) * 8e-6)


def test_time_to_accuracy_from_rounds_and_ledger():
    rows = [row(0, 0, 1, "down", 1000, "query.init_codec")]
    for rnd in (1, 2, 3):
        rows += [row(rnd, 0, 1, "down", 1_000_000), row(rnd, 0, 1, "up", 250_000)]
    metrics = pd.DataFrame({"round": [1, 2, 3], "accuracy": [0.5, 0.93, 1.0], "compute_s": [10.0, 10.0, 10.0]})
    tta = time_to_accuracy(metrics, rows, rtt_ms=20.0)
    assert set(tta) == {"1mbps", "10mbps", "100mbps"} and set(tta["10mbps"]) == {"90pct", "95pct", "99pct"}
    init, exchange = 0.02 + 8000 / 1e7, 0.02 + 1.25e6 * 8 / 1e7  # at 10 Mbit/s
    assert tta["10mbps"]["90pct"] == pytest.approx(init + 20 + 2 * exchange, abs=1e-3)  # round 2 reaches 93 %
    assert tta["10mbps"]["95pct"] == tta["10mbps"]["99pct"] == pytest.approx(init + 30 + 3 * exchange, abs=1e-3)
    assert tta["1mbps"]["90pct"] > tta["10mbps"]["90pct"] > tta["100mbps"]["90pct"] > 20
    assert all(v is None for v in time_to_accuracy(metrics.assign(accuracy=[0.0, 0.0, 0.0]), rows, 20.0)["1mbps"].values())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("net")
    base = {"num_server_rounds": 2, "local_steps": 2, "steps_per_exchange": 1, "batch_size": 4, "num_samples": 120,
            "hidden_size": 32, "image_size": 16, "patch_size": 4, "out_dir": str(out), "checkpoint": False}
    sym = run_in_process(scratch_cfg(run_name="sym", **base), out / "sym", clients=2)
    asym = run_in_process(scratch_cfg(run_name="asy", uplink_mbps=1.0, downlink_mbps=100.0, **base), out / "asy", clients=2)
    return out, sym, asym


def test_the_run_files_split_the_simulated_time(runs):
    out, _, _ = runs
    metrics = pd.read_csv(out / "sym" / "metrics.csv")
    assert list(metrics.columns) == list(METRIC_COLUMNS)
    for col in ("compute_s", "sim_uplink_s", "sim_downlink_s"):
        assert (metrics[col] > 0).all(), col
    assert (metrics.sim_uplink_s + metrics.sim_downlink_s - metrics.sim_network_s).abs().max() < 1e-5
    assert (metrics.compute_s <= metrics.wall_s).all()
    summary = json.loads((out / "sym" / "summary.json").read_text())
    assert summary["sim_uplink_s"] + summary["sim_downlink_s"] == pytest.approx(summary["sim_network_s"], abs=1e-5)
    assert summary["compute_s"] == pytest.approx(metrics.compute_s.sum(), abs=1e-3)
    assert summary["sim_total_s"] == pytest.approx(summary["compute_s"] + summary["sim_network_s"], abs=1e-3)
    assert set(summary["time_to_accuracy_s"]) == {"1mbps", "10mbps", "100mbps"}


def test_the_default_network_numbers_are_the_old_ones(runs):
    """With uplink-mbps = downlink-mbps = 0, every exchange costs what it did before the
    split (the old formula, replayed on the run's own ledger), to the bit."""
    out, sym, _ = runs
    cfg = scratch_cfg()
    rows = [LedgerRow(*r) for r in pd.read_csv(out / "sym" / "ledger.csv").itertuples(index=False)]
    total = 0.0
    for _, group in exchanges_of(rows):
        per_node = {}
        for r in group:
            per_node[r.node] = per_node.get(r.node, 0) + r.wire_bytes
        total += max(old_client_seconds(cfg.bandwidth_mbps, cfg.rtt_ms, b) for b in per_node.values())
    assert round(total, 6) == sym["sim_network_s"]
    # the recomputation behind time-to-accuracy agrees with the live ledger
    per_round = network_seconds_per_round(rows, NetworkModel.from_config(cfg))
    assert sum(per_round.values()) == pytest.approx(total, rel=1e-12)


def test_a_slow_uplink_shows_in_the_uplink_share(runs):
    _, sym, asym = runs
    assert asym["uplink_bytes"] == pytest.approx(sym["uplink_bytes"], rel=0.01)  # the same traffic
    assert asym["sim_uplink_s"] > 5 * sym["sim_uplink_s"]  # 1 Mbit/s instead of 10
    assert asym["sim_downlink_s"] < sym["sim_downlink_s"]  # 100 Mbit/s instead of 10
