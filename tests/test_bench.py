"""The benchmark driver runs and reports (it asserts nothing about speed)."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments import bench
from experiments.bench_profile import top_costs


def test_codec_figures_run_and_report(tmp_path):
    assert bench.main(["--quick", "--only", "P2,P4,P6", "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "bench.csv")
    assert set(df["figure"]) == {"P2", "P4", "P6"}
    # P2: the serialised message is never smaller than its information payload
    p2 = df[df["figure"] == "P2"]
    assert (p2["wire_bytes"] > p2["payload_bytes"]).all()
    # P4: ANS cannot beat the i.i.d. entropy bound of the message's own histogram
    ans = df[df["setting"].str.endswith(" ans")]
    assert (ans["coded_bytes"] >= ans["bound_bytes"] - 1).all()
    md = (tmp_path / "bench.md").read_text()
    for fig in ("P1", "P2", "P4", "P5", "P6"):
        assert f"| {fig} |" in md
    assert "not run" in md  # P1 and P5 were not selected
    # the report rebuilds from the run's own files, unchanged
    assert bench.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.md").read_text() == md


def test_profile_reduction_skips_idle_frames_and_ranks_busy_ones():
    collapsed = "\n".join([
        "process 1:python;main (a.py:1);step (sim/x.py:3) 30",
        "process 1:python;main (a.py:1);wait (threading.py:9) 500",
        "process 1:python;main (a.py:1);pack (sim/y.py:4) 10",
    ])
    rows = top_costs(collapsed, top=5)
    assert [r["setting"].split(" ")[0] for r in rows] == ["step", "pack"]
    assert rows[0]["value"] == pytest.approx(75.0)


def test_targets_are_judged_in_the_right_direction():
    assert bench.met("P1", 0.95) == "met" and bench.met("P1", 0.5) != "met"
    assert bench.met("P2", 1.01) == "met" and bench.met("P2", 1.05) != "met"
    assert bench.met("P5", 3.9) == "met" and bench.met("P5", 4.0) != "met"
    assert bench.met("P6", None) == "not run"


@pytest.mark.slow
def test_quick_benchmark_runs_everything(tmp_path):
    """The smoke run of every figure, profile included (~265 s on the idle 2-core box: three Ray
    simulations and a py-spy profile of a fourth). Run with ``-m slow``; CI runs the codec
    figures (above) and the Flower paths through the simulation and parity tests."""
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "bench.csv")
    assert {"P1", "P1-curve", "P1d", "P2", "P4", "P5", "P6", "profile"} <= set(df["figure"])
    assert (tmp_path / "bench.json").is_file()


@pytest.mark.slow
def test_quick_deployment_figure_and_its_breakdown(tmp_path):
    """``--quick --only P1d``: one run of the tiny config on a TLS deployment with 2
    SuperNodes, with and without site workers, each beside the in-process reference (~3 min on the 2-core box at a load of 4-5;
    run with ``-m slow``). The breakdown's components are the last reply's of each exchange,
    so they add up to its wait; none may be negative beyond clock granularity (/proc start
    times count in 10 ms ticks), i.e. a client never reports more than the server waited."""
    from experiments.bench_sim import BREAKDOWN

    assert bench.main(["--quick", "--only", "P1d", "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "bench.csv")
    rows = df[df["figure"] == "P1d"].set_index("site_workers")
    assert len(rows) == 2
    for workers, row in rows.iterrows():
        assert row["value"] > 0 and row["clients"] == 2 and row["exchanges"] == 3  # 4 steps, 2 per exchange
        parts = {c: row[c] for c in (*BREAKDOWN, "t_server")}
        assert all(v >= -0.05 for v in parts.values()), parts
        assert sum(row[c] for c in BREAKDOWN) <= row["exchange_s"] + 0.05
        assert row["t_start"] > 0 and row["t_compute"] > 0  # Flower starts a process for every message
    # without a site worker that process imports torch and rebuilds the client; with one it does neither
    assert rows.loc[False, "t_import_torch"] > 0 and rows.loc[False, "t_rebuild"] > 0
    assert rows.loc[True, "t_import_torch"] == 0 and rows.loc[True, "t_import_transformers"] == 0
    md = (tmp_path / "bench.md").read_text()
    assert "| P1d |" in md and "## Where an exchange's time goes" in md and "| deployment | tiny config |" in md


def test_a_missed_target_is_reported_with_its_reason(tmp_path):
    df = pd.DataFrame([
        {"figure": "P6", "setting": "rdfsq b=2 encode+pack", "repeat": 0, "value": 0.3, "unit": "× FSQ"},
        {"figure": "P4", "setting": "rdfsq b=2 ans", "repeat": 0, "value": 1.001},
    ])
    bench.write_report(df, tmp_path, {"cpus": 2}, "python -m experiments.bench", 1.0)
    md = (tmp_path / "bench.md").read_text()
    p6 = next(line for line in md.splitlines() if line.startswith("| P6 |"))
    p4 = next(line for line in md.splitlines() if line.startswith("| P4 |"))
    assert "**missed**: " + bench.WHY_MISSED["P6"] in p6
    assert p4.rstrip().endswith("| met |")


def test_figures_and_tables_are_medians_over_repeats(tmp_path):
    df = pd.DataFrame([
        *({"figure": "P5", "setting": "1000 SuperNodes, 4 sampled", "clients": 1000, "sampled": 4, "repeat": r,
           "value": v} for r, v in enumerate([3.0, 3.9, 3.2])),
        *({"figure": "P5", "setting": "10 SuperNodes, 4 sampled", "clients": 10, "sampled": 4, "repeat": r,
           "value": 9.0} for r in range(3)),
        *({"figure": "P2", "setting": "rdfsq 8 samples", "payload_bytes": 16596, "repeat": r, "value": v}
          for r, v in enumerate([1.1, 1.5, 1.2])),
    ])
    assert bench.headline(df, "P5") == pytest.approx(3.2)  # median of the 1000-node repeats, not the 10-node run
    assert bench.headline(df, "P2") == pytest.approx(1.2)
    bench.write_report(df, tmp_path, {"cpus": 2}, "python -m experiments.bench", 1.0)
    row = next(line for line in (tmp_path / "bench.md").read_text().splitlines()
               if line.startswith("| 1000 SuperNodes, 4 sampled |"))
    assert "| 3.200 | 3 – 3.900 | 3 |" in row



def test_profile_gives_up_on_a_run_that_does_not_end():
    """py-spy waits for every process it follows; a run that outlives the bound is
    interrupted (it then writes what it sampled) instead of holding the benchmark forever."""
    import time

    from experiments.bench import plan
    from experiments.bench_profile import profile_exchange

    p = plan(quick=True)
    t0 = time.perf_counter()
    rows = profile_exchange(p["p1_default"], p["p1_default_clients"], top=5, timeout_s=3)
    assert time.perf_counter() - t0 < 90 and rows and all(r["figure"] == "profile" for r in rows)
    failed = [r["setting"] for r in rows if r["setting"].startswith("py-spy failed")]
    assert all("timed out after 3 s" in f for f in failed)  # a partial profile, or the reason it has none


# ----------------------------------------------------------------------------- issue 18: real-size and --gpu
def test_real_size_configs_are_the_real_architectures():
    """The shapes of experiments/real_size.py give the published parameter counts (built on
    the meta device: no memory, no weights) and the token counts N of the papers."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        Qwen2Config,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from experiments.real_size import LLMS, TOWERS

    def count(m) -> float:
        return sum(p.numel() for p in m.parameters()) / 1e6

    with torch.device("meta"):
        towers = {n: count(SiglipVisionModel(SiglipVisionConfig(**s))) for n, s in TOWERS.items()}
        llms = {n: count(AutoModelForCausalLM.from_config((LlamaConfig if k == "llama" else Qwen2Config)(**s)))
                for n, (k, s) in LLMS.items()}
    assert 86 < towers["siglip-base-patch16-224"] < 94 and 400 < towers["siglip-so400m-patch14-384"] < 430
    assert 134 < llms["smollm-135m"] < 135 and 494 < llms["qwen2-0.5b"] < 495  # Qwen2-0.5B: 494 M, tied head
    assert [(s["image_size"] // s["patch_size"]) ** 2 for s in TOWERS.values()] == [196, 729]


def test_real_size_quick_runs_every_pair_and_the_bytes_match_the_formula(tmp_path):
    """``--real-size --quick``: shrunken shapes, the same path (save_pretrained -> vision-tower=<dir>
    / llm=<dir> -> one split step through the engine); every row's ledger bytes equal the formula."""
    from experiments.real_size import OPTIONS, QUICK_LLMS, QUICK_TOWERS

    assert bench.main(["--real-size", "--quick", "--out", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "real_size.csv")
    base = df[df["option"] == "frozen tower"]
    assert len(base) == 8 and (base["split"] == "connector").sum() == 4  # 4 pairs x 2 split points
    assert set(df["option"]) == set(OPTIONS)
    assert ((df["feature_ratio"] - 1).abs() <= 0.01).all() and ((df["total_ratio"] - 1).abs() <= 0.01).all()
    for _, r in df.iterrows():
        t, m = QUICK_TOWERS[r["tower"]], QUICK_LLMS[r["llm"]][1]
        assert r["N"] == (t["image_size"] // t["patch_size"]) ** 2
        assert r["D"] == (m["hidden_size"] if r["split"] == "connector" else t["hidden_size"])
        assert r["split"] == "connector" or r["split"] == f"vit-ln1:{t['num_hidden_layers'] // 2}"
    small = df[(df["tower"] == "siglip-base-patch16-224") & (df["llm"] == "smollm-135m") & (df["split"] == "connector")]
    opt = small.set_index("option")
    full = opt.loc["frozen tower"]
    assert opt.loc["LoRA r=8", "server_trainable_m"] < full["server_trainable_m"]
    assert opt.loc["align stage (LLM frozen)", "server_trainable_m"] < opt.loc["LoRA r=8", "server_trainable_m"]
    assert opt.loc["tower trained", "client_trainable_m"] > full["client_trainable_m"]
    assert opt.loc["gradient checkpointing", "loss"] == full["loss"]  # recomputing changes nothing
    md = (tmp_path / "real_size.md").read_text()
    assert "`python -m experiments.bench --real-size --quick`" in md and md.count("\n| siglip-") == len(df)


def test_gpu_benchmark_runs_on_the_cpu(tmp_path, monkeypatch):
    """``--gpu`` with ``--device cpu``: throughput, memory (n/a), the codecs' share, and P1's
    configuration (the Ray run itself is the quick benchmark's P1, stubbed here)."""
    from experiments import bench_gpu, bench_sim

    seen = {}

    def fake_p1(config, clients, repeats, label):
        seen.update(config=config, clients=clients)
        return [{"figure": "P1", "setting": label, "repeat": 0, "value": 0.9, "sim_samples_per_s": 9.0,
                 "ref_samples_per_s": 10.0, "runtime_s_per_exchange": 0.01}]

    monkeypatch.setattr(bench_sim, "p1_protocol_efficiency", fake_p1)
    df = bench_gpu.run(True, tmp_path, device="cpu", pairs=[("siglip-so400m-patch14-384", "qwen2-0.5b")])
    thr = df[df["figure"] == "throughput"]
    assert len(thr) == 2 and (thr["samples_per_s"] > 0).all() and thr["gpu_peak_gb"].isna().all()
    assert ((thr["codec_share"] > 0) & (thr["codec_share"] < 1)).all() and (thr["codec_calls"] > 0).all()
    assert seen["config"]["device"] == "cpu" and "client-gpus" not in seen["config"]
    md = (tmp_path / "gpu_bench.md").read_text()
    assert md.startswith("# Split steps on cpu") and "| n/a |" in md and "## P1" in md


def test_codec_timer_counts_outermost_calls_and_restores_the_classes():
    import torch

    from experiments.bench_gpu import CodecTimer
    from sim.compress import get_codec

    codec = get_codec("rdfsq")(16, 2)
    client, server = codec.client(), codec.server()
    forward = type(client).forward
    timer = CodecTimer("cpu")
    with timer.patched():
        enc = client(torch.randn(2, 3, 16))
        server.unpack(client.pack(enc), (2, 3, 16))  # unpack calls decode: one outermost call
    assert timer.calls == 3 and timer.seconds > 0 and type(client).forward is forward


def test_an_only_run_replaces_its_figures_and_keeps_the_others(tmp_path):
    import json

    old = pd.DataFrame([{"figure": "P1", "setting": "a", "repeat": 0, "value": 0.9},
                        {"figure": "P1-curve", "setting": "b", "repeat": 0, "value": 0.8},
                        {"figure": "P1d", "setting": "old", "repeat": 0, "value": 0.1}])
    old.to_csv(tmp_path / "bench.csv", index=False)
    (tmp_path / "bench.json").write_text(json.dumps({"command": "python -m experiments.bench", "wall_s": 60.0,
                                                     "machine": {"date": "then"}}))
    new = pd.DataFrame([{"figure": "P1d", "setting": "default config", "repeat": 0, "value": 0.6}])
    df, meta = bench.merged_with_earlier(new, {"command": "python -m experiments.bench --only P1d", "wall_s": 6.0,
                                               "machine": {"date": "now"}}, tmp_path)
    assert sorted(df["setting"]) == ["a", "b", "default config"]
    assert [e["command"] for e in meta["earlier"]] == ["python -m experiments.bench"]
    bench.write_report(df, tmp_path, meta["machine"], meta["command"], meta["wall_s"], meta["earlier"])
    md = (tmp_path / "bench.md").read_text()
    assert "are from `python -m experiments.bench` (1.0 min, then)" in md


def test_a_one_setting_part_replaces_only_that_setting(tmp_path):
    import json

    old = pd.DataFrame([{"figure": "P5", "setting": "1000 SuperNodes, 4 sampled", "repeat": r, "value": 3.5,
                         "clients": 1000} for r in range(3)]
                       + [{"figure": "P5", "setting": "10000 SuperNodes, 4 sampled", "repeat": 0, "value": 9.0,
                           "clients": 10000}])
    old.to_csv(tmp_path / "bench.csv", index=False)
    (tmp_path / "bench.json").write_text(json.dumps({"command": "python -m experiments.bench", "wall_s": 60.0,
                                                     "machine": {"date": "then"}}))
    new = pd.DataFrame([{"figure": "P5", "setting": "10000 SuperNodes, 4 sampled", "repeat": 0, "value": 2.0,
                         "clients": 10000}])
    df, _ = bench.merged_with_earlier(new, {"command": "c", "wall_s": 1.0, "machine": {}}, tmp_path, by_setting=True)
    assert sorted(df["value"]) == [2.0, 3.5, 3.5, 3.5]
    assert bench.headline(df, "P5") == 2.0  # the run with the most SuperNodes
    df_fig, _ = bench.merged_with_earlier(new, {"command": "c", "wall_s": 1.0, "machine": {}}, tmp_path)
    assert list(df_fig["value"]) == [2.0]  # a whole-figure run replaces the figure


def test_a_stopped_run_is_a_missed_p5_with_its_reason(tmp_path):
    df = pd.DataFrame([
        {"figure": "P5", "setting": "1000 SuperNodes, 4 sampled", "repeat": 0, "value": 3.5, "clients": 1000},
        {"figure": "P5", "setting": "10000 SuperNodes, 4 sampled", "repeat": 0, "value": 2.1, "clients": 10000,
         "stopped": "not finished in 2400 s: 2420 of 10000 query.hello replies received, 0 rounds finished"}])
    bench.write_report(df, tmp_path, {}, "python -m experiments.bench --only P5-10k", 60.0)
    line = next(x for x in (tmp_path / "bench.md").read_text().splitlines() if x.startswith("| P5 |"))
    assert "**missed**" in line and "2420 of 10000 query.hello" in line and "| 2.1" in line


def test_run_progress_counts_hello_replies_and_rounds(tmp_path):
    from experiments.bench_sim import run_progress

    assert run_progress(tmp_path, 10) == "0 of 10 query.hello replies received, 0 rounds finished"
    pd.DataFrame([{"kind": "query.hello", "direction": d} for d in ("down", "up", "down", "up", "down")]).to_csv(
        tmp_path / "ledger.csv", index=False)
    pd.DataFrame([{"round": 1}]).to_csv(tmp_path / "metrics.csv", index=False)
    assert run_progress(tmp_path, 10) == "2 of 10 query.hello replies received, 1 rounds finished"
