"""The clipped feature-noise defence and its (ε, δ): per-sample clipping, fresh noise per
release (the recompute sees the noise that was sent), C = 0 unchanged, and the accounting
against dp-accounting's own RDP composition (sim/model/feature_noise.py,
sim/training/feature_dp.py, docs/privacy.md)."""

import math

import numpy as np
import pytest
import torch
from conftest import scratch_cfg
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from sim.config import ConfigError, SplitConfig
from sim.data.batches import step_indices
from sim.model.feature_noise import FeatureRelease, add_feature_noise, clip_per_sample, image_noise_seed
from sim.training import client as client_ops
from sim.training.client import client_batch, client_runtime, encode_eval, micro_batch, release_tag
from sim.training.feature_dp import (
    NO_CLIP_REASON, RESIDUAL_REASON, feature_dp_summary, feature_epsilon, noise_multiplier,
    releases_per_train_image_max, train_release_counts,
)
from sim.training.server import initial_client_weights


@pytest.fixture
def dp_cfg(tmp_path) -> SplitConfig:
    return scratch_cfg(
        num_server_rounds=2, local_steps=3, steps_per_exchange=3, batch_size=4, num_samples=60, hidden_size=32,
        image_size=16, patch_size=4, compressor="identity", identity_dtype="fp32", bits=16,
        feature_noise=0.5, feature_noise_clip=1.0, out_dir=str(tmp_path), run_name="run",
    )


def runtime(cfg: SplitConfig):
    rt = client_runtime(cfg, 0, 2)
    client_ops.load_weights(rt, initial_client_weights(cfg))
    return rt


def sent(rt, idx, tag) -> torch.Tensor:
    """The image stream's features as they go into the codec."""
    with torch.no_grad():
        return rt.model.stream_inputs(client_batch(rt, idx, tag=tag)).image


# ----------------------------------------------------------------------------- clipping
def test_clipping_bounds_each_sample_and_is_identity_under_the_bound():
    torch.manual_seed(0)
    x = torch.randn(5, 4, 8) * torch.tensor([0.01, 0.1, 1.0, 10.0, 0.0]).view(5, 1, 1)
    x.requires_grad_(True)
    y = clip_per_sample(x, 1.0)
    norms = torch.linalg.vector_norm(y.detach().flatten(1), dim=1)
    assert bool((norms <= 1.0 * (1 + 1e-6)).all())
    for b in (0, 1, 4):  # within the bound (the zero row included): bitwise unchanged
        assert torch.equal(y[b], x[b])
    for b in (2, 3):  # over it: scaled onto the sphere, same direction
        assert math.isclose(float(norms[b]), 1.0, rel_tol=1e-6)
        assert torch.allclose(y[b] * torch.linalg.vector_norm(x[b]), x[b], rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="feature-noise-clip"):
        add_feature_noise(x, torch.rand(5, 3, 4, 4), 0.5, 0, FeatureRelease("t", -1.0))


# ----------------------------------------------------------------------------- fresh noise per release
def test_release_noise_repeats_within_a_release_and_is_fresh_across_releases():
    torch.manual_seed(0)
    pix, x = torch.rand(3, 3, 8, 8), torch.zeros(3, 4, 16)
    r1, r2 = FeatureRelease("train/p0/r1/s0", 1.0), FeatureRelease("train/p0/r2/s0", 1.0)
    a = add_feature_noise(x, pix, 0.5, 7, r1)
    assert torch.equal(a, add_feature_noise(x, pix, 0.5, 7, r1))  # the recompute sees what was sent
    assert not torch.equal(a, add_feature_noise(x, pix, 0.5, 7, r2))
    assert not torch.equal(a, add_feature_noise(x, pix, 0.5, 8, r1))
    swapped = add_feature_noise(x, pix[[1, 0, 2]], 0.5, 7, r1)
    assert torch.equal(swapped[0], a[1])  # follows the image, not its slot in the micro-batch


def test_clip_zero_keeps_the_per_image_noise_bitwise():
    torch.manual_seed(0)
    pix, x = torch.rand(3, 3, 8, 8), torch.randn(3, 4, 16)
    old = torch.stack([x[b] + 0.5 * torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(
        image_noise_seed(pix[b], 3)), dtype=torch.float32) for b in range(3)])
    assert torch.equal(add_feature_noise(x, pix, 0.5, 3), old)
    assert torch.equal(add_feature_noise(x, pix, 0.5, 3, FeatureRelease("train/p0/r1/s0", 0.0)), old)
    assert torch.equal(add_feature_noise(x, pix, 0.5, 3, FeatureRelease("train/p0/r2/s0", 0.0)), old)


def test_client_path_with_clip_zero_is_the_old_forward(dp_cfg):
    rt = runtime(dp_cfg.replace(feature_noise_clip=0.0))
    idx = micro_batch(rt, 1, 0)
    batch = client_batch(rt, idx, tag=release_tag(rt, "train", 1, 0))
    with torch.no_grad():
        assert torch.equal(rt.model.encode(batch).image.y, rt.model(batch.pixels).y)


def test_recompute_in_the_same_step_sees_the_sent_noise_other_rounds_draw_afresh(dp_cfg, monkeypatch):
    rt = runtime(dp_cfg)
    idx = micro_batch(rt, 1, 0)
    y11 = sent(rt, idx, release_tag(rt, "train", 1, 0))
    assert torch.equal(y11, sent(rt, idx, release_tag(rt, "train", 1, 0)))
    assert not torch.equal(y11, sent(rt, idx, release_tag(rt, "train", 2, 0)))
    assert not torch.equal(y11, sent(rt, idx, release_tag(rt, "train", 1, 1)))

    # encode_steps and the recompute in apply_steps name the same releases; evaluations differ by round
    encoded, applied = [], []
    real_encode = rt.model.encode
    monkeypatch.setattr(rt.model, "encode", lambda b: (encoded.append(b.release), real_encode(b))[1])
    monkeypatch.setattr(client_ops, "client_apply_grads", lambda m, o, bs, *a: applied.extend(b.release for b in bs) or [])
    client_ops.encode_steps(rt, 1, [0, 1])
    client_ops.apply_steps(rt, 1, [0, 1], [None, None])
    assert encoded == applied and len({r.tag for r in encoded}) == 2 and all(r.clip == 1.0 for r in encoded)
    encoded.clear()
    encode_eval(rt, 1)
    eval1 = {r.tag for r in encoded}
    encoded.clear()
    encode_eval(rt, 2)
    assert len(eval1) == 1 and eval1 != {r.tag for r in encoded}


def test_clipping_only_is_a_valid_config(dp_cfg):
    cfg = dp_cfg.replace(feature_noise=0.0, feature_noise_clip=0.05)
    rt = runtime(cfg)
    x = sent(rt, micro_batch(rt, 1, 0), release_tag(rt, "train", 1, 0))
    assert bool((torch.linalg.vector_norm(x.flatten(1), dim=1) <= 0.05 * (1 + 1e-6)).all())
    assert feature_dp_summary(cfg, 2) == {}
    with pytest.raises(ValueError, match="release tag"):
        client_batch(rt, micro_batch(rt, 1, 0))


# ----------------------------------------------------------------------------- accounting
def reference_epsilon(z: float, count: int, delta: float) -> float:
    """dp-accounting's own RDP accountant, without Flower's wrapper."""
    acc = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), count))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma,clip,count", [(1.0, 1.0, 1), (2.0, 0.5, 30), (3.0, 1.0, 480), (0.7, 0.2, 9)])
def test_epsilon_is_dp_accountings_gaussian_composition(sigma, clip, count):
    assert noise_multiplier(sigma, clip) == sigma / (2 * clip)
    eps = feature_epsilon(sigma, clip, count, 1e-5)
    assert math.isclose(eps, reference_epsilon(sigma / (2 * clip), count, 1e-5), rel_tol=1e-9)


def test_epsilon_falls_with_sigma_and_grows_with_releases():
    by_sigma = [feature_epsilon(s, 1.0, 50, 1e-5) for s in (0.5, 1.0, 2.0, 4.0)]
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == 4
    by_count = [feature_epsilon(2.0, 1.0, k, 1e-5) for k in (1, 10, 100, 1000)]
    assert by_count == sorted(by_count) and len(set(by_count)) == 4
    assert feature_epsilon(2.0, 1.0, 0, 1e-5) == 0.0
    assert feature_epsilon(0.0, 1.0, 3, 1e-5) == math.inf
    with pytest.raises(ValueError):
        feature_epsilon(1.0, 0.0, 3, 1e-5)


def test_release_counts_follow_the_micro_batches(dp_cfg):
    cfg = dp_cfg.replace(num_server_rounds=3, local_steps=5, batch_size=4)
    counts = train_release_counts(cfg, 10, 0)
    direct = np.zeros(10, dtype=np.int64)
    for rnd in (1, 2, 3):
        for step in range(5):
            local = step_indices(10, 4, cfg.seed, 0, rnd, step)
            direct[np.unique(local)] += 1
    assert np.array_equal(counts, direct) and counts.sum() == 3 * 5 * 4  # b <= n: no repeat within a step
    assert counts.max() <= 3 * math.ceil(5 * 4 / 10)
    assert train_release_counts(cfg, 3, 0).max() == 3 * 5  # b > n: every step holds every image once


def test_summary_entry(dp_cfg):
    entry = feature_dp_summary(dp_cfg, 2)["feature_dp"]
    most, exact = releases_per_train_image_max(dp_cfg, 2)
    assert exact and entry["releases_per_train_image_max"] == most and entry["releases_per_test_image"] == 2
    assert entry["epsilon"] == feature_epsilon(0.5, 1.0, max(most, 2), 1e-5)
    assert (entry["delta"], entry["sigma"], entry["clip"]) == (1e-5, 0.5, 1.0)
    assert feature_dp_summary(dp_cfg.replace(feature_noise_delta=1e-3), 2)["feature_dp"]["epsilon"] < entry["epsilon"]
    no_clip = feature_dp_summary(dp_cfg.replace(feature_noise_clip=0.0), 2)["feature_dp"]
    assert no_clip["epsilon"] is None and no_clip["reason"] == NO_CLIP_REASON
    assert feature_dp_summary(dp_cfg.replace(feature_noise=0.0, feature_noise_clip=0.0), 2) == {}
    residual = dp_cfg.replace(split_point="vit-ln1:1", residual_mode="transmit", residual_compressor="identity")
    assert feature_dp_summary(residual, 2)["feature_dp"]["reason"] == RESIDUAL_REASON


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("key,value", [("feature-noise-clip", -0.5), ("feature-noise-delta", 0.0),
                                       ("feature-noise-delta", -1e-5), ("feature-noise-delta", 1.0)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        SplitConfig.from_run_config({key: value})


def test_defaults_leave_runs_unchanged():
    cfg = SplitConfig()
    assert (cfg.feature_noise_clip, cfg.feature_noise_delta) == (0.0, 1e-5)
