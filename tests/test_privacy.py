"""Feature-inversion study: the attacker holds exactly the ledger's bytes, the feature-noise
defence, the decoder and its metrics, the case-study datasets as run values, the --quick driver.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SCRATCH, scratch_cfg

from experiments.attack import DecoderBudget, fit_decoder, image_metrics, reconstruct
from experiments.privacy_capture import TextRecovery, capture_eval_uplink, observe, text_recovery
from sim.config import ConfigError, SplitConfig
from sim.data import load_examples
from sim.data.batches import eval_text, pixels
from sim.data.casestudy import generate_faces_vqa
from sim.data.tokenizer import get_tokenizer
from sim.model import build_client_model, load_client_state
from sim.model.feature_noise import add_feature_noise
from sim.model.processor import image_processor
from sim.training.client import client_runtime, load_weights
from sim.training.server import build_server, initial_client_weights
from sim.wire.arrays import record_to_arrays

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def faces_cfg(tmp_path) -> SplitConfig:
    return scratch_cfg(
        dataset="faces", num_samples=80, hidden_size=32, image_size=16, patch_size=4, batch_size=4,
        compressor="rdfsq", bits=2, test_fraction=0.25, out_dir=str(tmp_path), run_name="run",
    )


# ----------------------------------------------------------------------------- the attacker's bytes
def test_attacker_consumes_exactly_the_ledger_bytes(faces_cfg):
    cfg = faces_cfg
    weights = initial_client_weights(cfg)
    server = build_server(cfg)
    cap = capture_eval_uplink(cfg, weights, 0, 2)

    # what the attacker holds is the message as Flower serialises it: exactly the ledger's wire bytes
    assert cap.nbytes == cap.row.wire_bytes
    assert cap.row.kind == "evaluate.split_infer" and cap.row.direction == "up" and cap.row.partition == 0
    msg = cap.message()
    arrays = record_to_arrays(msg.content.array_records["features"])
    raw = sum(a.nbytes for a in arrays.values())
    assert raw == cap.row.feature_bytes > 0

    # it decodes exactly those bytes: the feature record, as the ServerApp decodes it
    obs = observe(cap, cfg, server)
    assert obs.consumed_bytes == cap.row.feature_bytes
    rt = client_runtime(cfg, 0, 2)
    n = len(rt.test_idx)
    assert obs.features.shape == (n, cfg.num_image_tokens, cfg.hidden_size)

    # ... which are bitwise what the victim's client half computed (the codec's y; the last
    # micro-batch is padded by wrap-around, as the client does)
    load_weights(rt, weights)
    idx = rt.test_idx[np.arange(-(-n // cfg.batch_size) * cfg.batch_size) % n]
    with torch.no_grad():
        y = torch.cat([rt.model(pixels(rt.data, idx[i:i + cfg.batch_size], image_processor(cfg))).y for i in range(0, len(idx), cfg.batch_size)])
    assert torch.equal(obs.features, y[:n])

    # ... and depend on nothing but the captured bytes: scrambling the client's cached model
    # and data afterwards changes nothing
    with torch.no_grad():
        for p in rt.model.parameters():
            p.add_(1.0)
    rt.data.images.zero_()
    try:
        again = observe(cap, cfg, server)
    finally:
        client_runtime.__globals__["_tokenised"].cache_clear()
        client_runtime.__globals__["_model_and_optimiser"].cache_clear()
    assert torch.equal(again.features, obs.features)


def test_capture_reads_labels_in_the_clear(faces_cfg):
    cfg = faces_cfg
    cap = capture_eval_uplink(cfg, initial_client_weights(cfg), 1, 2)
    obs = observe(cap, cfg, build_server(cfg))
    rt = client_runtime(cfg, 1, 2)
    prompts, answers = eval_text(rt.data, rt.test_idx)
    assert text_recovery(obs, prompts, answers) == TextRecovery(1.0, 1.0, 1.0)
    tok = get_tokenizer(cfg)
    assert {tok.decode(a) for a in obs.answers} <= {"yes", "no", "dark", "medium", "bright"}
    # a wrong ground truth is not "recovered"
    assert text_recovery(obs, prompts, [a[::-1] + 1 for a in answers]).answers == 0.0
    wrong_first = [np.concatenate([[p[0] + 1], p[1:]]) for p in prompts]
    got = text_recovery(obs, wrong_first, answers)
    assert got.prompts_exact == 0.0 and 0.0 < got.prompt_tokens < 1.0


# ----------------------------------------------------------------------------- feature noise
def test_feature_noise_is_seeded_per_image():
    torch.manual_seed(0)
    pix = torch.rand(3, 3, 8, 8)
    x = torch.zeros(3, 4, 16, requires_grad=True)
    a = add_feature_noise(x, pix, 0.5, seed=1)
    b = add_feature_noise(x, pix, 0.5, seed=1)
    assert torch.equal(a, b)  # deterministic: the recompute before backward sees the same values
    assert not torch.equal(a, add_feature_noise(x, pix, 0.5, seed=2))
    swapped = add_feature_noise(x, pix[[1, 0, 2]], 0.5, seed=1)
    assert torch.equal(swapped[0], a[1]) and torch.equal(swapped[1], a[0])  # follows the image, not the slot
    assert not torch.equal(a[0], a[1])
    assert torch.equal(add_feature_noise(x, pix, 0.0, seed=1), x)
    big = add_feature_noise(torch.zeros(64, 64, 64), torch.rand(64, 3, 4, 4), 0.3, seed=3)
    assert abs(float(big.std()) - 0.3) < 0.01 and abs(float(big.mean())) < 0.01
    a.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError):
        add_feature_noise(x, pix, -1.0, seed=1)


def test_client_model_adds_noise_before_the_compressor(faces_cfg):
    clean = build_client_model(faces_cfg.replace(compressor="identity", identity_dtype="fp32", bits=16))
    noisy = build_client_model(faces_cfg.replace(compressor="identity", identity_dtype="fp32", bits=16, feature_noise=0.5))
    load_client_state(noisy, {n: t.clone() for n, t in initial_client_weights(faces_cfg.replace(
        compressor="identity", identity_dtype="fp32", bits=16)).items()})
    pix = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        y0, y1, y2 = clean(pix).y, noisy(pix).y, noisy(pix).y
    assert torch.equal(y1, y2)
    diff = y1 - y0
    assert 0.45 < float(diff.std()) < 0.55
    with pytest.raises(ConfigError, match="feature-noise"):
        SplitConfig(feature_noise=-0.1)


# ----------------------------------------------------------------------------- decoder and metrics
def test_image_metrics_match_the_definitions():
    torch.manual_seed(0)
    t = torch.rand(5, 3, 16, 16)
    p = (t + 0.05 * torch.randn_like(t)).clamp(0, 1)
    psnr, ssim = image_metrics(p, t)
    mse = ((p - t) ** 2).double().mean(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(psnr, 10 * np.log10(1.0 / mse), rtol=1e-6)
    with np.errstate(divide="ignore"):  # identical images: PSNR is +inf
        inf_psnr, same = image_metrics(t, t)
    assert np.isinf(inf_psnr).all()
    np.testing.assert_allclose(same, 1.0)
    assert (ssim < 1.0).all() and (ssim > 0.5).all()


def test_decoder_inverts_a_linear_patch_encoding_and_is_deterministic():
    """Features = a fixed random linear map of each 4x4 patch: the decoder must beat the mean image."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.nn.functional.interpolate(torch.rand(400, 3, 4, 4, generator=g), scale_factor=4)  # 4x4 colour blocks
    patches = imgs.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(400, 16, 48)
    feats = patches @ torch.randn(48, 24, generator=g)
    budget = DecoderBudget(steps=150, batch=32, lr=3e-3, width=32)
    dec = fit_decoder(feats[:300], imgs[:300], budget, seed=1)
    psnr, _ = image_metrics(reconstruct(dec, feats[300:]), imgs[300:])
    base, _ = image_metrics(imgs[:300].mean(0, keepdim=True).expand(100, -1, -1, -1), imgs[300:])
    assert psnr.mean() > base.mean() + 8
    again = fit_decoder(feats[:300], imgs[:300], budget, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(dec.state_dict().values(), again.state_dict().values()))


# ----------------------------------------------------------------------------- case studies as run values
@pytest.mark.parametrize("name", ["pathology", "retina", "faces"])
def test_case_studies_are_dataset_values_loading_the_private_pool(name):
    cfg = scratch_cfg(dataset=name, num_samples=40, image_size=16, hidden_size=32)
    exs = load_examples(cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_samples, cfg.seed)
    from sim.data.casestudy import CASE_STUDY_DATASETS, CASE_STUDY_VOCABULARIES

    ref = CASE_STUDY_DATASETS[name](40, cfg.seed, 16, "private")
    assert all(np.array_equal(a.image, b.image) and a.turns == b.turns for a, b in zip(exs, ref))
    vocab = get_tokenizer(cfg).get_vocab()
    assert set(CASE_STUDY_VOCABULARIES[name]()) <= set(vocab)
    with pytest.raises(ConfigError, match="image-size"):
        scratch_cfg(dataset=name, image_size=8, patch_size=4)


def test_faces_run_never_sees_a_public_source():
    from sim.data.casestudy import PUBLIC_FACE_SOURCES, faces_sources

    src = faces_sources(500, 3, "private")
    assert not set(src.tolist()) & set(PUBLIC_FACE_SOURCES)
    exs = generate_faces_vqa(20, 3, 16, "private")
    assert all(np.array_equal(a.image, b.image) for a, b in zip(exs, load_examples("faces", "", 16, 20, 3)))


# ----------------------------------------------------------------------------- the driver
def test_quick_study_runs_end_to_end(tmp_path):
    out = tmp_path / "privacy"
    proc = subprocess.run([sys.executable, "-m", "experiments.inversion", "--quick", "--jobs", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "privacy.csv")
    assert set(df.regime) == {"finetune"}  # the headline regime: victims fine-tune the shipped checkpoint
    noisy = df[df.sigma > 0]
    assert len(noisy) and (noisy["clip"] > 0).all() and (noisy.epsilon > 0).all() and np.isfinite(noisy.epsilon).all()
    assert df[df.sigma == 0].epsilon.isna().all() and set(df.nopeek) == {0.0, 0.3}
    assert set(df.threat) == {"white-box", "black-box", "mean-image"}
    # every threat of every victim has the weak and the strong attacker; the sweep victim also 2x the public pool
    # and the converged check (the strong decoder under the longer rule, white-box)
    conv = df[df.attacker == "converged"]
    assert len(conv) == 1 and conv.iloc[0].threat == "white-box" and conv.iloc[0].method == "identity"
    assert bool(conv.iloc[0].decoder_steps > df[df.attacker == "strong"].decoder_steps.max())
    attacked = df[(df.threat != "mean-image") & (df.attacker != "converged")]
    assert set(attacked.attacker) == {"weak", "strong"} and set(df[df.threat == "mean-image"].attacker) == {"none"}
    one = attacked[attacked.public_scale == 1]
    assert (one.groupby(["method", "bits", "sigma", "clip", "nopeek", "text_mode", "threat"]).attacker.nunique() == 2).all()
    assert set(df[df.attacker == "strong"].public_scale) == {1, 2}
    assert (df[df.public_scale == 2].attacker == "strong").all()
    strong = df[df.attacker == "strong"]
    assert (strong.public_images == 96 * strong.public_scale).all() and (strong.decoder_steps <= 12).all()
    # the learning curves: the kept weights' validation PSNR is the maximum of each curve
    curves = pd.read_csv(out / "privacy_curves.csv")
    image = curves[curves.target == "image"]
    fitted = pd.concat([strong, conv])  # every fit to a validation plateau has its curve
    assert set(image.key) == set(fitted.key)
    best = image.groupby("key").val_psnr.max()
    np.testing.assert_allclose(fitted.set_index("key").val_psnr.loc[best.index], best.values)
    assert (image.groupby("key").step.max() == fitted.set_index("key").decoder_steps.loc[best.index].values).all()
    # the text stream of the quantized victim: both readers measured; the learned one has a curve
    q = df[df.text_mode == "quantized"]
    assert set(q.attacker) == {"weak", "strong"} and q.prompt_token_recovery.between(0, 1).all()
    assert set(curves[curves.target == "text"].key) <= set(q.key) and len(curves[curves.target == "text"])
    assert (df.capture_bytes == df.ledger_wire_bytes).all()
    ids = df[df.text_mode == "ids"]
    assert (ids.consumed_bytes == ids.ledger_feature_bytes).all()
    assert (df.answer_recovery == 1.0).all()
    assert df.psnr.between(3, 60).all() and df.ssim.between(-1, 1).all()
    for name in ("privacy.md", "privacy_summary.csv", "privacy_utility.png", "privacy_psnr_vs_bits.png",
                 "privacy_psnr_vs_bytes.png", "privacy_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "privacy_config.json").read_text())["errors"] == []
    md = (out / "privacy.md").read_text()
    assert "Quick run" in md and "What compression does not protect" in md
    first = md.split("\n\n")[1]  # the first paragraph after the title
    assert "`text-mode=ids`" in first and "reads every question and every answer directly" in first
    ids = df[df.text_mode == "ids"]
    assert f"{100 * ids.prompt_token_recovery.mean():.1f} % of the question tokens" in first
    assert f"{100 * q[q.attacker == 'strong'].prompt_token_recovery.mean():.1f} % with a decoder trained" in first
    assert "![learning curves of the strong attacker](privacy_learning_curves.png)" in md
    assert (out / "privacy_learning_curves.png").is_file()
    assert "| `quantized` | learned decoder, 1x public prompts" in md and "Weak vs strong attacker" in md
    # every row of the grid is there, so a rerun would only rebuild the report
    from experiments.inversion import QUICK, done_keys, quick_grid

    want = set().union(*(v.keys(QUICK) for v in quick_grid()))
    assert done_keys(out / "privacy.csv") == want == set(df.key)


@pytest.mark.slow
def test_capture_matches_the_ledger_of_a_real_flower_run(tmp_path):
    """The replayed evaluate reply has the byte counts the strategy's ledger records for
    partition 0 in a real Ray simulation of the same config (sizes do not depend on the
    weights for these codecs; the Message metadata may differ by a few bytes of ids)."""
    over = {**SCRATCH, "dataset": "faces", "num-samples": 80, "hidden-size": 32, "image-size": 16, "patch-size": 4,
            "batch-size": 4, "test-fraction": 0.25, "num-server-rounds": 1, "local-steps": 2,
            "steps-per-exchange": 1, "compressor": "rdfsq", "bits": 2}
    cmd = [sys.executable, "-m", "sim", "run", "--clients", "2", "--out", str(tmp_path / "run")]
    for k, v in over.items():
        cmd += ["-c", f"{k}={v}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = pd.read_csv(tmp_path / "run" / "ledger.csv")
    row = ledger[(ledger.kind == "evaluate.split_infer") & (ledger.direction == "up") & (ledger.partition == 0)].iloc[0]
    cfg = SplitConfig.from_run_config(over)
    cap = capture_eval_uplink(cfg, initial_client_weights(cfg), 0, 2)
    assert cap.row.feature_bytes == row.feature_bytes
    assert cap.row.payload_bytes == row.payload_bytes
    assert abs(cap.row.wire_bytes - row.wire_bytes) <= 64, (cap.row.wire_bytes, row.wire_bytes)


def test_rows_of_another_grid_are_set_aside_not_lost(tmp_path):
    from experiments.inversion import append_rows, done_keys, set_aside_stale

    path = tmp_path / "privacy.csv"
    append_rows(path, [{"key": "current", "psnr": 20.0}, {"key": "old", "psnr": 30.0}])
    assert set_aside_stale(path, {"current"}) == 1
    assert done_keys(path) == {"current"}
    assert done_keys(tmp_path / "privacy_stale.csv") == {"old"}
    assert set_aside_stale(path, {"current"}) == 0  # idempotent


def test_rows_written_before_the_strong_attacker_are_upgraded_and_reused(tmp_path):
    """An old privacy.csv (no attacker/public_scale columns) is rewritten in the current schema
    on first touch: its rows become the weak attacker (none for the mean image) on the 1x pool,
    and keep their keys, which the weak rows of the current grid still hash to."""
    import csv
    import hashlib
    from dataclasses import asdict

    from experiments.inversion import CLIENTS, QUICK, Attack, append_rows, done_keys, quick_grid, set_aside_stale
    from experiments.privacy_report import with_attacker_columns
    from experiments.privacy_rows import COLUMNS

    v = quick_grid()[0]
    old_key = hashlib.sha256(json.dumps(
        {"cfg": v.config(QUICK).to_run_config(), "threat": "white-box", "clients": CLIENTS, "aux": QUICK.aux_samples,
         "dec": asdict(QUICK.decoder), "sur": asdict(QUICK.surrogate)}, sort_keys=True).encode()).hexdigest()[:16]
    assert v.key(QUICK, Attack("white-box", "weak")) == old_key
    assert v.key(QUICK, Attack("white-box", "strong")) != old_key != v.key(QUICK, Attack("white-box", "strong", 2))

    path = tmp_path / "privacy.csv"
    old_columns = [c for c in COLUMNS if c not in ("attacker", "public_scale", "prompt_exact_recovery",
                                                   "public_images", "decoder_steps", "best_step", "val_psnr",
                                                   "stopped_early")]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_columns)
        w.writeheader()
        w.writerow({"key": old_key, "threat": "white-box", "psnr": 20.0})
        w.writerow({"key": "base", "threat": "mean-image", "psnr": 12.0})
        w.writerow({"key": "gone", "threat": "black-box", "psnr": 9.0})
    # the report reads the old file as it is
    old = with_attacker_columns(pd.read_csv(path))
    assert list(old.attacker) == ["weak", "none", "weak"] and list(old.public_scale) == [1, 1, 1]
    assert done_keys(path) == {old_key, "base", "gone"}
    assert set_aside_stale(path, {old_key, "base", "new"}) == 1
    append_rows(path, [{"key": "new", "threat": "white-box", "attacker": "strong", "public_scale": 2, "psnr": 25.0}])
    df = pd.read_csv(path)
    assert tuple(df.columns) == COLUMNS
    assert list(df.attacker) == ["weak", "none", "strong"] and list(df.public_scale) == [1, 1, 2]
    stale = pd.read_csv(tmp_path / "privacy_stale.csv")
    assert tuple(stale.columns) == COLUMNS and list(stale.key) == ["gone"] and list(stale.attacker) == ["weak"]


def test_grids_of_both_regimes():
    """The fine-tuning grid pairs identity with RD-FSQ b = 2 over 3 seeds on both datasets and
    both threat models, and has the clipped-noise (with ε) and NoPeek defences; the scratch
    grid is the earlier study, from random weights."""
    from experiments.inversion import BUDGETS, DP_CLIP, SEEDS, full_grid

    ft, scratch = full_grid("finetune"), full_grid("scratch")
    assert len(SEEDS) >= 3
    for d in ("faces", "pathology"):
        for m, b in (("identity", 16), ("rdfsq", 2)):
            vs = [v for v in ft if (v.dataset, v.method, v.bits, v.sigma, v.nopeek, v.text_mode) == (d, m, b, 0, 0, "ids")]
            assert sorted(v.seed for v in vs) == list(SEEDS)
            assert all({"white-box", "black-box", "mean-image"} <= set(v.threats) for v in vs)
    noisy = [v for v in ft if v.sigma > 0]
    assert noisy and all(v.clip == DP_CLIP for v in noisy) and any(v.nopeek > 0 for v in ft)
    assert all(v.clip == 0 and v.nopeek == 0 for v in scratch)
    cfg_ft = ft[0].config(BUDGETS[("finetune", False)])
    cfg_scratch = scratch[0].config(BUDGETS[("scratch", False)])
    assert cfg_ft.init_dir is not None and cfg_scratch.init_dir is None
    with pytest.raises(ValueError, match="unknown regime"):
        full_grid("pretrain")


def test_parallel_victims_write_the_same_rows(tmp_path):
    """--jobs runs victims in separate processes; the rows (accuracies, PSNRs) are those of one process."""
    from experiments.inversion import QUICK, Victim, run_study

    grid = [Victim("faces", "rdfsq", 2, 0.0, 0, ("white-box",)), Victim("faces", "identity", 16, 0.0, 1, ("white-box",))]
    frames = []
    for jobs in (1, 2):
        csv_path = tmp_path / f"jobs{jobs}" / "privacy.csv"
        csv_path.parent.mkdir()
        assert run_study(grid, QUICK, csv_path, tmp_path / f"ex{jobs}", jobs=jobs) == []
        frames.append(pd.read_csv(csv_path).sort_values(["key"]).reset_index(drop=True))
    # (the whole message's length may differ by a few bytes: the timing-s meta of a process's first reply)
    cols = ["key", "acc", "psnr", "ssim", "consumed_bytes", "ledger_feature_bytes"]
    pd.testing.assert_frame_equal(frames[0][cols], frames[1][cols])


def test_converged_attacker_rows_are_extra_and_keep_the_other_keys():
    """A victim with ``converge`` adds one white-box ``converged`` row (the strong decoder under
    the longer stopping rule) without changing the keys of its other rows."""
    import dataclasses

    from experiments.inversion import FULL, Attack, Victim

    v = Victim("faces", "rdfsq", 2, 0.0, 0, ("white-box", "black-box", "mean-image"))
    c = dataclasses.replace(v, converge=True)
    extra = [a for a in c.attacks(FULL) if a not in v.attacks(FULL)]
    assert extra == [Attack("white-box", "converged")]
    assert v.keys(FULL) < c.keys(FULL) and len(c.keys(FULL)) == len(v.keys(FULL)) + 1
    assert FULL.converged.stop.max_steps > FULL.strong.decoder.stop.max_steps
    longer = dataclasses.replace(FULL, converged=dataclasses.replace(FULL.converged, lr=1e-3))
    assert v.keys(longer) == v.keys(FULL) and c.keys(longer) != c.keys(FULL)  # only the converged row's key moves
