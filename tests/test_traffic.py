"""``python -m experiments.traffic --quick``: the both-directions study end to end, and its
bookkeeping (bytes from the ledger, pairing by seed, time to accuracy, best ratios)."""

import math

import pandas as pd
import pytest

from experiments import traffic


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("traffic")
    assert traffic.main(["--quick", "--seeds", "0", "1", "--out", str(out)]) == 0
    return out


def test_quick_study_writes_rows_report_and_plot(quick_dir):
    df = pd.read_csv(quick_dir / "traffic.csv", dtype={"key": str})
    assert len(df) == 2 * len(traffic.QUICK_PAIRS) and df.key.is_unique
    assert list(df.seed) == [0, 0, 1, 1]  # seed-major: an interrupted study keeps whole seeds
    for name in ("traffic.md", "traffic.png", "traffic_summary.csv", "traffic_invocations.csv"):
        assert (quick_dir / name).stat().st_size > 0
    md = (quick_dir / "traffic.md").read_text()
    assert "| fp16 | fp32 | 2 |" in md and "| rdfsq2 | frozen | 2 |" in md and "Best ratio at ≤ 1 point" in md
    # bytes are the ledger's, both directions: the frozen pair sends gradients only in the align round
    base, frozen = (df[(df.up == u) & (df.down == d)].iloc[0] for u, d in traffic.QUICK_PAIRS)
    assert frozen.grad_bytes * 2 == pytest.approx(base.grad_bytes, rel=0.01)  # 1 of 2 rounds; same sample count
    assert frozen.up_bytes < base.up_bytes and frozen.samples == base.samples > 0
    assert 0 < frozen.eval_bytes < frozen.up_bytes + frozen.down_bytes  # evaluation: its requests and replies


def test_the_study_resumes_and_rebuilds_the_report(quick_dir):
    before = pd.read_csv(quick_dir / "traffic.csv")
    assert traffic.main(["--quick", "--seeds", "0", "1", "--out", str(quick_dir)]) == 0
    assert len(pd.read_csv(quick_dir / "traffic.csv")) == len(before)
    assert traffic.main(["--quick", "--seeds", "0", "1", "--out", str(quick_dir), "--report-only"]) == 0


def test_unknown_pair_is_a_clear_error(tmp_path, capsys):
    assert traffic.main(["--quick", "--pairs", "fp16/carrier-pigeon", "--out", str(tmp_path)]) == 2
    assert "unknown pair" in capsys.readouterr().err


def _row(up, down, seed, acc_rounds, computes, net, samples=100, up_b=1000, down_b=1000):
    return {"key": f"{up}{down}{seed}", "up": up, "down": down, "seed": seed, "clients": 2, "acc": acc_rounds[-1],
            "acc_per_round": ";".join(map(str, acc_rounds)), "samples": samples, "up_bytes": up_b, "down_bytes": down_b,
            "grad_bytes": 0, "weight_bytes": 0, "eval_bytes": 0, "compute_s": ";".join(map(str, computes)),
            **{f"net_s_{bw}mbps": ";".join(map(str, net)) for bw in traffic.BANDWIDTHS_MBPS}}


def test_summary_pairs_by_seed_and_finds_the_best_ratio_within_the_cost():
    rows = [
        _row("fp16", "fp32", 0, [0.5, 0.9], [1, 1], [0.5, 2, 2], up_b=4000, down_b=6000),
        _row("fp16", "fp32", 1, [0.85, 0.8], [1, 1], [0.5, 2, 2], up_b=4000, down_b=6000),
        _row("rdfsq2", "frozen", 0, [0.4, 0.89], [1, 1], [0.1, 0.2, 0.2], up_b=500, down_b=500),  # -1 pt at 10x
        _row("rdfsq2", "frozen", 1, [0.6, 0.79], [1, 1], [0.1, 0.2, 0.2], up_b=500, down_b=500),
        _row("rdfsq1", "frozen", 0, [0.81, 0.80], [1, 1], [0.1, 0.1, 0.1], up_b=250, down_b=250),  # -10 pt at 20x
        _row("rdfsq1", "frozen", 1, [0.9, 0.70], [1, 1], [0.1, 0.1, 0.1], up_b=250, down_b=250),
    ]
    summary, target = traffic.summarise(pd.DataFrame(rows))
    s = summary.set_index(["up", "down"])
    assert target == pytest.approx(0.95 * 0.85)
    assert s.loc[("rdfsq2", "frozen"), "diff_mean"] == pytest.approx(-0.01)
    assert s.loc[("rdfsq2", "frozen"), "diff_se"] == pytest.approx(0.0)  # the same -1 pt on both seeds
    assert s.loc[("rdfsq2", "frozen"), "ratio"] == pytest.approx(10.0)
    assert s.loc[("rdfsq1", "frozen"), "ratio"] == pytest.approx(20.0)
    best = traffic.best_within(summary, 1)
    assert (best.up, best.down) == ("rdfsq2", "frozen")
    assert traffic.best_within(summary, 0.5).up == "fp16"
    assert traffic.best_within(summary, 10).up == "rdfsq1"
    # time to 0.8075: base seed 0 in round 2 (0.5 + 1+2 + 1+2 = 6.5 s), seed 1 in round 1 (3.5 s)
    assert s.loc[("fp16", "fp32"), "tta_10mbps"] == pytest.approx(5.0)
    assert math.isnan(s.loc[("rdfsq2", "frozen"), "tta_10mbps"])  # seed 1 never gets there
    assert s.loc[("rdfsq1", "frozen"), "tta_10mbps"] == pytest.approx(0.1 + 1 + 0.1)
