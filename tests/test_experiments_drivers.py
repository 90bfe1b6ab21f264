"""The experiment drivers' --quick versions end to end, and their bookkeeping.

The quick runs use a tiny model for a few steps: their accuracies mean nothing, but the
files, the resumable CSV, the byte measurements and the claim rules are real."""

import json
import math

import pandas as pd
import pytest

from experiments import bitsweep, claims, comm, entropy, make_heldout
from experiments.common import QUICK_BUDGET, make_spec, mean_std, run_one, summarise

TOKENS = (QUICK_BUDGET["image-size"] // QUICK_BUDGET["patch-size"]) ** 2
DIM = QUICK_BUDGET["hidden-size"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    args = ["--quick", "--regime", "scratch", "--methods", "identity,fsq,rdfsq,topk,vq", "--bits", "1,2", "--seeds", "0,1",
            "--jobs", "1", "--out", str(out)]
    assert bitsweep.main(args) == 0
    return out


def test_bitsweep_quick_writes_rows_report_and_plots(sweep_dir):
    df = pd.read_csv(sweep_dir / "bitsweep.csv")
    assert len(df) == 2 * (1 + 3 * 2 + 1)  # seeds x (identity + 3 scalar methods x 2 bits + vq at b=2)
    assert df.key.is_unique
    for name in ("bitsweep.md", "bitsweep_accuracy_vs_bits.png", "bitsweep_pareto.png", "bitsweep_summary.csv"):
        assert (sweep_dir / name).stat().st_size > 0
    md = (sweep_dir / "bitsweep.md").read_text()
    assert "Identity (fp16) accuracy between seeds" in md and "| rdfsq | 2 | 2 |" in md


def test_bitsweep_bytes_come_from_the_messages(sweep_dir):
    s = summarise(pd.read_csv(sweep_dir / "bitsweep.csv")).set_index(["method", "bits"])
    # packed codes: N*D*b/8 bytes per sample (no side information for rdfsq/fsq), fp16 for identity
    assert s.loc[("identity", 16), "feature_bytes_per_sample"] == TOKENS * DIM * 2
    assert s.loc[("rdfsq", 2), "feature_bytes_per_sample"] == TOKENS * DIM * 2 / 8
    assert s.loc[("rdfsq", 2), "ratio"] == 8.0 and s.loc[("fsq", 1), "ratio"] == 16.0
    assert s.loc[("vq", 2), "feature_bytes_per_sample"] == TOKENS * 2 / 8  # one 2-bit index per token
    # topk pays for its positions: more than its nominal 16/b ratio promises
    assert s.loc[("topk", 2), "ratio"] < 8.0
    # the whole message frames the payload: more bytes than the features, and gradients come down in fp32
    assert (s.up_wire_bytes_per_sample > s.feature_bytes_per_sample).all()
    assert (s.down_wire_bytes_per_sample > TOKENS * DIM * 4).all()


def test_bitsweep_resumes_without_rerunning(sweep_dir, monkeypatch):
    before = pd.read_csv(sweep_dir / "bitsweep.csv")
    monkeypatch.setattr(bitsweep.os, "getloadavg", lambda: (3.25, 2.0, 1.0))  # a machine with other jobs on it
    args = ["--quick", "--regime", "scratch", "--methods", "identity,rdfsq", "--bits", "2", "--seeds", "0,1", "--jobs", "1",
            "--out", str(sweep_dir)]
    assert bitsweep.main(args) == 0
    after = pd.read_csv(sweep_dir / "bitsweep.csv")
    assert len(after) == len(before)  # every run of the smaller grid was already there
    inv = pd.read_csv(sweep_dir / "bitsweep_invocations.csv")
    assert inv.runs.tolist()[-1] == 0
    assert len(inv) == 2 and inv.load_1m_at_start.tolist()[-1] == 3.25  # every invocation records the machine's load
    assert inv.load_1m_at_start.notna().all()
    assert "| fsq |" not in (sweep_dir / "bitsweep.md").read_text()  # the report shows the requested grid only


def test_bitsweep_set_changes_every_run_and_rejects_bad_keys(tmp_path, capsys):
    assert bitsweep.main(["--quick", "--regime", "scratch", "-c", "no-such-key=1", "--out", str(tmp_path)]) == 2
    assert "no-such-key" in capsys.readouterr().err and not list(tmp_path.iterdir())  # nothing ran or was written
    args = ["--quick", "--regime", "scratch", "--methods", "rdfsq", "--bits", "2", "--seeds", "0", "--jobs", "1",
            "--out", str(tmp_path), "--name", "clip"]
    assert bitsweep.main([*args, "-c", "rdfsq-clip=1.5"]) == 0
    assert "rdfsq-clip=1.5" in (tmp_path / "clip.md").read_text()
    assert bitsweep.main(args) == 0  # the same grid at the default clip: other runs, in the same file
    df = pd.read_csv(tmp_path / "clip.csv")
    assert len(df) == 2 and df.key.is_unique and df.final_loss.nunique() == 2


def test_runs_are_deterministic_given_the_seed():
    spec = make_spec("synthetic", "rdfsq", 2, 3, 2, QUICK_BUDGET)
    a, b = run_one(spec), run_one(spec)
    for k in ("acc", "final_loss", "up_wire_bytes_per_sample", "down_wire_bytes_per_sample"):
        assert a[k] == b[k]


def test_heldout_sweep_on_a_llava_json_dataset(tmp_path):
    data = make_heldout.build("pathology", tmp_path / "data", 60, 0, 16)
    out = tmp_path / "out"
    args = ["--quick", "--regime", "scratch", "--data-path", str(data), "--methods", "identity,rdfsq", "--bits", "2",
            "--seeds", "0", "--jobs", "1", "--out", str(out)]
    assert bitsweep.main(args) == 0
    df = pd.read_csv(out / "heldout.csv")
    assert len(df) == 2 and df.dataset.str.startswith("llava-json:").all()
    assert (df.n_llava == df.n_test).all()  # JSON records' own question types count as "llava"


def test_make_heldout_reuses_its_own_build_and_never_overwrites_other_data(tmp_path, capsys):
    out = tmp_path / "pathology"
    args = ["--out", str(out), "--num-samples", "20", "--image-size", "16"]
    assert make_heldout.main(args) == 0
    stamp = (out / "data.json").stat().st_mtime_ns
    assert make_heldout.main(args) == 0  # the documented command twice in a row: reused, not rebuilt
    assert (out / "data.json").stat().st_mtime_ns == stamp and "reused" in capsys.readouterr().out
    assert make_heldout.main([*args, "--seed", "1"]) == 2  # other parameters: refused
    assert "built with" in capsys.readouterr().err
    (out / make_heldout.MANIFEST).unlink()  # e.g. a user's own data.json: never touched
    assert make_heldout.main(args) == 2 and (out / "data.json").stat().st_mtime_ns == stamp


def test_bad_data_path_is_a_clear_error(tmp_path, capsys):
    assert bitsweep.main(["--quick", "--data-path", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_entropy_quick(tmp_path):
    assert entropy.main(["--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "entropy.json").read_text())
    scaled = summary["trained"]["scaled"]  # b = ceil(H) of the pooled entropy of the scaled features, at least 1
    assert summary["recommended_bits"] == scaled["recommended_bits"] == max(1, math.ceil(scaled["pooled_mean"]))
    rows = pd.read_csv(tmp_path / "entropy.csv")
    assert set(rows.space) == {"connector", "projected", "scaled"} and rows.batch.max() == 3
    codes = pd.read_csv(tmp_path / "entropy_codes.csv")
    assert ((codes.code_entropy_bits >= 0) & (codes.code_entropy_bits <= codes.bits + 1e-9)).all()
    md = (tmp_path / "entropy.md").read_text()
    assert "silverman" in md and "What the number means" in md
    for name in ("entropy_density.png", "entropy_codes.png", "entropy_per_dim.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_comm_quick_without_flower(tmp_path):
    assert comm.main(["--quick", "--no-flower", "--out", str(tmp_path), "--methods", "identity:16,rdfsq:2"]) == 0
    inf = pd.read_csv(tmp_path / "comm_inference.csv").set_index("method")
    assert inf.loc["identity", "feature_bytes"] == TOKENS * DIM * 2
    assert inf.loc["rdfsq", "feature_bytes"] == TOKENS * DIM * 2 / 8
    lat = pd.read_csv(tmp_path / "comm_latency.csv")
    assert sorted(lat.bandwidth_mbps.unique()) == [0.25, 0.5, 1.0, 2.0, 4.0]
    # transmission time halves when the bandwidth doubles
    g = lat[lat.name == "split identity b=16"].set_index("bandwidth_mbps").transmit_s
    assert g[0.25] == pytest.approx(2 * g[0.5]) and g[1.0] == pytest.approx(inf.loc["identity", "inference_up_bytes"] * 8 / 1e6)
    jpeg = pd.read_csv(tmp_path / "comm_jpeg.csv")
    photos = jpeg[jpeg.images.str.contains("photos")].set_index("format").bytes_mean
    assert photos["JPEG-10"] < photos["JPEG-90"]
    assert (tmp_path / "comm.md").exists() and (tmp_path / "comm_latency.png").exists()


def test_cloud_only_jpeg_accuracy_evaluates_the_trained_model_on_jpeg_images():
    from sim.config import SplitConfig
    from sim.training.client import client_runtime
    from sim.training.reference import run_reference

    cfg = SplitConfig.from_run_config({**QUICK_BUDGET, **comm.method_overrides("identity", 16)})
    res = run_reference(cfg, 2)
    rows = {r["format"]: r for r in comm.cloud_only_accuracy(cfg, res.server, res.client_weights, 2, 1)}
    assert set(rows) == {"raw RGB uint8", "JPEG-10", "JPEG-90"}
    raw = rows["raw RGB uint8"]
    assert (raw["correct"], raw["total"]) == res.eval_counts["all"]  # the raw row is the run's own accuracy
    assert all(r["total"] == raw["total"] for r in rows.values())
    assert rows["JPEG-10"]["bytes_mean"] < rows["JPEG-90"]["bytes_mean"]
    assert raw["bytes_mean"] == 3 * cfg.image_size**2
    images = client_runtime(cfg, 0, 2).data.images
    degraded, sizes = comm.jpeg_images(images[:8], 10)
    assert degraded.dtype == images.dtype and degraded.shape == (8, *images.shape[1:])
    assert (degraded != images[:8]).any() and (sizes > 0).all()


def test_claims_report_from_quick_results(sweep_dir, tmp_path):
    out = tmp_path / "results.md"
    assert claims.main(["--results", str(sweep_dir), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| claim | data | our number" in text and "87.50%" in text
    wall = next(line for line in text.splitlines() if line.startswith("| `python -m experiments.bitsweep --regime scratch` |"))
    assert wall.count("|") == 4 and "not recorded" not in wall  # the quick sweep recorded its load average


# ------------------------------------------------------------------ the rules, on hand-made summaries
def _summary(rows):
    cols = ["method", "bits", "acc_mean", "acc_std", "seeds", "feature_bytes_per_sample", "up_wire_bytes_per_sample",
            "down_wire_bytes_per_sample"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows])


BASE = [("identity", 16, 0.50, 0.01, 3, 2048.0, 2100.0, 4200.0)]


def test_rdfsq_claim_needs_more_than_two_std():
    s = _summary(BASE + [("rdfsq", 2, 0.60, 0.02, 3, 256, 300, 4200), ("fsq", 2, 0.50, 0.02, 3, 256, 300, 4200)])
    assert claims.rdfsq_beats_fsq(s, "t", "cmd").verdict == "reproduced"  # +10 points > 2 x 2
    s = _summary(BASE + [("rdfsq", 2, 0.53, 0.02, 3, 256, 300, 4200), ("fsq", 2, 0.50, 0.02, 3, 256, 300, 4200)])
    assert claims.rdfsq_beats_fsq(s, "t", "cmd").verdict == "not reproduced (within noise)"  # +3 < 2 x 2
    s = _summary(BASE + [("rdfsq", 2, 0.40, 0.02, 3, 256, 300, 4200), ("fsq", 2, 0.50, 0.02, 3, 256, 300, 4200)])
    assert claims.rdfsq_beats_fsq(s, "t", "cmd").verdict == "not reproduced"
    s = _summary([("identity", 16, 0.5, math.nan, 1, 2048, 2100, 4200), ("rdfsq", 2, 0.6, math.nan, 1, 256, 300, 4200),
                  ("fsq", 2, 0.5, math.nan, 1, 256, 300, 4200)])
    assert claims.rdfsq_beats_fsq(s, "t", "cmd").verdict == "undetermined"


def test_optimum_claim_uses_the_plateau_and_the_entropy():
    curve = [("rdfsq", b, a, 0.01, 3, 256, 300, 4200) for b, a in ((1, 0.30), (2, 0.55), (3, 0.56), (4, 0.55), (5, 0.54))]
    ent = {"recommended_bits": 2, "trained": {"scaled": {"pooled_mean": 1.8},
                                              "connector": {"pooled_mean": 1.85, "recommended_bits": 2}}}
    assert claims.optimum_bits(_summary(BASE + curve), ent, "t", "cmd").verdict == "reproduced"
    ent["recommended_bits"] = 1
    assert claims.optimum_bits(_summary(BASE + curve), ent, "t", "cmd").verdict == "partly"
    rising = [("rdfsq", b, 0.1 * b, 0.01, 3, 256, 300, 4200) for b in range(1, 6)]
    ent["recommended_bits"] = 3
    assert claims.optimum_bits(_summary(BASE + rising), ent, "t", "cmd").verdict == "not reproduced"


def test_topk_and_vq_claims():
    rows = BASE + [(m, 2, a, 0.01, 3, 256, 300, 4200) for m, a in (("fsq", 0.5), ("rdfsq", 0.55), ("nf", 0.52))]
    assert claims.topk_worst(_summary(rows + [("topk", 2, 0.40, 0.01, 3, 600, 650, 4200)]), "t", "c").verdict == "reproduced"
    assert claims.topk_worst(_summary(rows + [("topk", 2, 0.49, 0.01, 3, 600, 650, 4200)]), "t", "c").verdict == "not reproduced"
    vq = [("vq", 2, 0.495, 0.01, 3, 2.0, 60, 4200), ("vq", 10, 0.30, 0.01, 3, 10.0, 120, 4200)]
    assert claims.vq_ratio(_summary(BASE + vq), "t", "c").verdict == "reproduced"  # 2048/2 = 1024x, 0.5-point drop
    strong = [("rdfsq", 2, 0.70, 0.01, 3, 256, 300, 4200)]
    assert claims.vq_ratio(_summary(BASE + vq + strong), "t", "c").verdict == "partly"  # identity is no upper bound
    vq = [("vq", 2, 0.30, 0.01, 3, 2.0, 60, 4200)]
    assert claims.vq_ratio(_summary(BASE + vq), "t", "c").verdict == "not reproduced"  # 1024x, but a 20-point drop
    vq = [("vq", 2, 0.30, 0.20, 3, 2.0, 60, 4200)]
    assert claims.vq_ratio(_summary(BASE + vq), "t", "c").verdict == "undetermined"  # large drop, larger spread
    vq = [("vq", 10, 0.50, 0.01, 3, 10.0, 60, 4200)]
    assert claims.vq_ratio(_summary(BASE + vq), "t", "c").verdict == "not reproduced"  # no drop, but only 205x


def _runs(rows):
    """Per-run rows (method, bits, seed, acc) of a fine-tuning-regime sweep."""
    return pd.DataFrame([dict(zip(("method", "bits", "seed", "acc"), r)) for r in rows]).assign(dataset="d")


def test_fine_tuning_regime_verdicts_are_paired_by_seed():
    # fsq is 2 points below rdfsq on every seed, while the seeds differ by 10 points: unpaired, that
    # is noise; paired, the differences (2.0, 2.0, 2.1) have a tiny spread and the claim holds
    seeds = {0: 0.80, 1: 0.90, 2: 0.70}
    runs = _runs([("identity", 16, k, a + 0.01) for k, a in seeds.items()]
                 + [("rdfsq", 2, k, a) for k, a in seeds.items()]
                 + [("fsq", 2, k, a - 0.02 - (0.001 if k == 2 else 0)) for k, a in seeds.items()])
    s = _summary([("identity", 16, 0.81, 0.10, 3, 2048, 2100, 400), ("rdfsq", 2, 0.80, 0.10, 3, 256, 300, 400),
                  ("fsq", 2, 0.7797, 0.10, 3, 256, 300, 400)])
    assert claims.rdfsq_beats_fsq(s, "t", "c").verdict == "not reproduced (within noise)"  # 2 points < 2 x 10
    paired = claims.rdfsq_beats_fsq(s, "t", "c", runs)
    assert paired.verdict == "reproduced" and "paired" in paired.number and "95 % CI" in paired.number
    # a paired difference whose sign flips between seeds does not count, whatever its mean
    flip = runs.copy()
    flip.loc[(flip.method == "fsq") & (flip.seed == 1), "acc"] = 0.95
    assert claims.rdfsq_beats_fsq(s, "t", "c", flip).verdict == "not reproduced (within noise)"


def test_retention_claim_reads_the_foundation_experiment():
    rows = [{"split": 0.90, "centralized": 0.91}, {"split": 0.89, "centralized": 0.90}]
    assert claims.retention(rows).verdict == "reproduced"  # 1.79 / 1.81 = 0.989
    rows = [{"split": 0.88, "centralized": 0.91}, {"split": 0.87, "centralized": 0.90}]
    v = claims.retention(rows)
    assert v.verdict == "not reproduced" and "retention 0.967" in v.number
    assert claims.retention(None).verdict == "undetermined"


def test_fine_tuning_sweep_quick_has_paired_columns_and_heads_the_claims(tmp_path):
    args = ["--quick", "--methods", "identity,fsq,rdfsq", "--bits", "2", "--seeds", "0,1", "--jobs", "1",
            "--out", str(tmp_path)]
    assert bitsweep.main(args) == 0  # the default regime: fine-tuning of the shipped checkpoint, 4 clients
    runs = pd.read_csv(tmp_path / "bitsweep_finetune.csv")
    assert (runs.clients == 4).all() and (runs.dataset == "pathology").all() and len(runs) == 6
    s = pd.read_csv(tmp_path / "bitsweep_finetune_summary.csv").set_index("method")
    r0, r1 = (runs[(runs.method == m)].sort_values("seed").acc.to_numpy() for m in ("rdfsq", "identity"))
    assert s.loc["rdfsq", "delta_mean"] == pytest.approx((r0 - r1).mean())
    assert s.loc["rdfsq", "retention"] == pytest.approx(r0.mean() / r1.mean()) and s.loc["identity", "retention"] == 1
    assert "retention" in (tmp_path / "bitsweep_finetune.md").read_text()
    out = tmp_path / "results.md"
    assert claims.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    table = [line for line in out.read_text().splitlines() if line.startswith("| RD-FSQ beats FSQ")]
    assert table and "fine-tuning from the checkpoint" in table[0] and "paired" in table[0]


def test_pareto_front_and_mean_std():
    pts = [(100, 0.5), (50, 0.4), (200, 0.45), (300, 0.7), (50, 0.3)]
    assert bitsweep.pareto_front(pts) == [1, 0, 3]
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    m, s, n = mean_std([0.5, float("nan")])
    assert (m, n) == (0.5, 1) and math.isnan(s)


@pytest.mark.slow
def test_comm_quick_flower_runs_match_the_in_process_measure(tmp_path):
    """The whole-run ledger of a real Flower simulation gives the same feature bytes per
    training sample as the bit sweep's replay of one exchange."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    assert comm.main(["--quick", "--out", str(out), "--runs", str(runs), "--methods", "identity:16,rdfsq:2"]) == 0
    done = pd.read_csv(out / "comm.csv").set_index("method")
    # the cloud-only baseline reloads the identity run's checkpoint: raw images give the run's own accuracy
    cloud = pd.read_csv(out / "comm_jpeg_accuracy.csv").set_index("format")
    assert cloud.loc["raw RGB uint8", "accuracy"] == done.loc["identity", "accuracy"]
    row = done.loc["rdfsq"]
    assert row.uplink_bytes + row.downlink_bytes == row.total_bytes
    assert row.feature_bytes_per_sample == TOKENS * DIM * 2 / 8
    swept = run_one(make_spec("synthetic", "rdfsq", 2, 0, 2, QUICK_BUDGET))
    assert swept["feature_bytes_per_sample"] == row.feature_bytes_per_sample
    assert swept["up_wire_bytes_per_sample"] == pytest.approx(row.up_wire_bytes_per_sample, rel=0.02)
    assert swept["down_wire_bytes_per_sample"] == pytest.approx(row.down_grad_wire_bytes_per_sample, rel=0.02)
    lat = pd.read_csv(out / "comm_latency.csv")
    train = lat[lat.kind == "train"].set_index("bandwidth_mbps")
    assert (train.steady_exchange_s.diff().dropna() < 0).all()  # faster links, shorter exchanges


def test_spine_recipe_records_per_type_and_train_accuracy_and_keeps_old_rows(tmp_path, monkeypatch):
    from experiments import spine_recipe

    monkeypatch.setattr(spine_recipe.os, "getloadavg", lambda: (1.75, 1.0, 1.0))
    out = tmp_path / "recipe.csv"
    pd.DataFrame([{"overrides": "lr=1e-3", "clients": 4, "final_accuracy": 0.5, "accuracy_per_round": "0.5",
                   "wall_s": 9}]).to_csv(out, index=False)  # an older file, without the newer columns
    tiny = ["num-server-rounds=2", "local-steps=2", "steps-per-exchange=1", "batch-size=4", "num-samples=120",
            "hidden-size=32", "image-size=16", "vision-layers=1", "llm-layers=1", "compressor=identity"]
    args = ["--clients", "1", "--train-samples", "8", "--out", str(out)] + [a for s in tiny for a in ("--set", s)]
    assert spine_recipe.main(args) == 0
    df = pd.read_csv(out)
    assert df.overrides.tolist() == ["lr=1e-3", " ".join(tiny)]
    new = df.iloc[1]
    assert len(new.accuracy_per_round.split()) == 2 and new.final_accuracy == float(new.accuracy_per_round.split()[-1])
    assert 0 <= new.train_accuracy <= 1 and new.load_1m_at_start == 1.75
    per_type = [c for c in df.columns if c.startswith("acc_")]
    assert per_type and all(0 <= new[c] <= 1 for c in per_type)
    assert math.isnan(df.iloc[0].train_accuracy)


def test_evaluate_global_scores_training_examples_on_request():
    from conftest import SCRATCH

    from sim.config import SplitConfig
    from sim.training.client import client_runtime
    from sim.training.reference import evaluate_global, run_reference

    cfg = SplitConfig.from_run_config({**SCRATCH, "num-server-rounds": 1, "local-steps": 1, "steps-per-exchange": 1,
                                       "batch-size": 4, "num-samples": 120, "hidden-size": 32, "image-size": 16, "vision-layers": 1,
                                       "llm-layers": 1, "compressor": "identity"})
    res = run_reference(cfg, 2)
    test_total = sum(len(client_runtime(cfg, p, 2).test_idx) for p in range(2))
    assert evaluate_global(cfg, res.server, res.client_weights, 2, 1)["all"][1] == test_total
    assert evaluate_global(cfg, res.server, res.client_weights, 2, 1, train_samples=5)["all"][1] == 2 * 5


def test_parity_finds_the_simulation_and_the_reference_equal(tmp_path, sim_run, in_process_run):
    from experiments import parity

    from conftest import SMALL

    args = ["--clients", "2", "--flower", str(sim_run), "--in-process", str(in_process_run), "--out", str(tmp_path)]
    assert parity.main(args + [a for k, v in SMALL.items() for a in ("-c", f"{k}={v}")]) == 0  # 0: every step equal
    table = pd.read_csv(tmp_path / "parity.csv")
    assert len(table) == 2 * 3 and (table.flower == table.in_process_threads_1).all()
    assert table.in_process_threads_2.notna().all()
    md = (tmp_path / "parity.md").read_text()
    assert "| in process (`python -m sim run --in-process`), Ray's thread count | 1 | 6 | 6 | 0 | none |" in md
    with pytest.raises(SystemExit, match="another config"):
        parity.main(args + ["-c", "seed=1"])


def test_exchange_staleness_pairs_by_seed_and_resumes(tmp_path, capsys):
    from experiments import exchange_staleness
    from experiments.common import QUICK_BUDGET

    cfg = [f"-c{k}={v}" for k, v in QUICK_BUDGET.items() if k != "steps-per-exchange"]
    args = ["--seeds", "0", "1", "--spe", "1", "4", "--clients", "2", "--out", str(tmp_path), *cfg]
    assert exchange_staleness.main(args) == 0
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert sorted(zip(runs.steps_per_exchange, runs.seed)) == [(1, 0), (1, 1), (4, 0), (4, 1)]
    # one trained round of 4 micro-batches: 4 + 1 training exchanges with S=1, 1 + 1 with S=4
    ex = runs.groupby("steps_per_exchange")["exchanges"].first()
    assert ex[1] - ex[4] == 3
    md = (tmp_path / "staleness.md").read_text()
    base = runs[runs.steps_per_exchange == 1].set_index("seed").final_accuracy
    big = runs[runs.steps_per_exchange == 4].set_index("seed").final_accuracy
    assert f"{100 * (big - base).mean():+.1f} ± " in md and "(n=2)" in md
    capsys.readouterr()
    assert exchange_staleness.main(args) == 0  # everything done: no run is repeated
    assert "steps-per-exchange 1, seed 0" not in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 4
    with pytest.raises(SystemExit):
        exchange_staleness.main(["-c", "seed=3", "--out", str(tmp_path)])
