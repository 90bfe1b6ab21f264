"""The strong attacker of the privacy study: the MK-MMD against an independent numpy reference,
early stopping (it stops on a plateau, keeps the best weights), the U-Net decoder, the learned
text reader, the FORA-aligned surrogate (experiments/mmd.py, early_stopping.py, strong_attack.py,
text_attack.py, attack.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import scratch_cfg

from experiments.attack import SurrogateBudget, image_metrics, reconstruct, surrogate_client
from experiments.early_stopping import StopRule, train_until_plateau
from experiments.mmd import BANDWIDTH_FACTORS, median_bandwidths, mk_mmd2
from experiments.strong_attack import StrongDecoderBudget, UNetDecoder, fit_strong_decoder, mean_psnr
from experiments.text_attack import TextDecoderBudget, fit_text_decoder, token_accuracy


# ----------------------------------------------------------------------------- MK-MMD
def _mmd2_unbiased_reference(x: np.ndarray, y: np.ndarray, h: np.ndarray) -> float:
    """MMD²_u of Gretton et al. (arXiv 0805.2368, the U-statistic), loop by loop, k = sum_s exp(-|a-b|²/h_s)."""
    x, y = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)

    def k(a, b):
        return sum(np.exp(-np.sum((a - b) ** 2) / hs) for hs in h)

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def _median_reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = np.concatenate([x.reshape(len(x), -1), y.reshape(len(y), -1)]).astype(np.float64)
    d = [np.sum((z[i] - z[j]) ** 2) for i in range(len(z)) for j in range(len(z)) if i != j]
    return np.median(d) * np.array(BANDWIDTH_FACTORS)


def test_mk_mmd_matches_the_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3, 4)).astype(np.float32)
    y = (rng.normal(size=(5, 3, 4)) * 1.5 + 0.7).astype(np.float32)
    h = np.array([0.5, 2.0, 8.0])
    got = float(mk_mmd2(torch.from_numpy(x), torch.from_numpy(y), torch.tensor(h)))
    assert got == pytest.approx(_mmd2_unbiased_reference(x, y, h), rel=1e-5, abs=1e-6)
    # the median heuristic: 5 + 2 rows give C(7, 2) = 21 distinct pairs, each counted twice, so the
    # two middle values agree (torch.median takes the lower one, numpy their mean)
    x2, y2 = x[:5], y[:2]
    bw = median_bandwidths(torch.from_numpy(x2), torch.from_numpy(y2)).double().numpy()
    np.testing.assert_allclose(bw, _median_reference(x2, y2), rtol=1e-5)
    got = float(mk_mmd2(torch.from_numpy(x2), torch.from_numpy(y2)))
    assert got == pytest.approx(_mmd2_unbiased_reference(x2, y2, bw), rel=1e-5, abs=1e-6)


def test_mk_mmd_separates_distributions_and_has_gradients():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    shifted = (b + 1.0).requires_grad_(True)
    same, apart = mk_mmd2(a, b), mk_mmd2(a, shifted)
    assert abs(float(same)) < 0.1 < float(apart)
    apart.backward()
    assert shifted.grad is not None and shifted.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2"):
        mk_mmd2(a[:1], b)


# ----------------------------------------------------------------------------- early stopping
def _patches(n: int, seed: int):
    """16x16 images of 4x4 colour blocks and, per 4x4 patch, a fixed random linear map of its pixels."""
    g = torch.Generator().manual_seed(seed)
    imgs = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), scale_factor=4)
    patches = imgs.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(n, 16, 48)
    return patches @ torch.randn(48, 24, generator=torch.Generator().manual_seed(99)), imgs


def test_early_stopping_stops_on_a_plateau_and_keeps_the_best_weights():
    """Uninformative features (all zero): the decoder can only learn the mean image, so the
    validation PSNR plateaus long before the cap."""
    _, imgs = _patches(160, 0)
    feats = torch.zeros(160, 16, 24)
    rule = StopRule(max_steps=3000, eval_every=10, patience=3, min_delta=0.01, lr_drops=1)
    budget = StrongDecoderBudget(stop=rule, batch=16, lr=3e-3, width=8, depth=1)
    dec, curve = fit_strong_decoder(feats[:128], imgs[:128], feats[128:], imgs[128:], budget, seed=0)
    assert curve.stopped_early and curve.steps_run < rule.max_steps
    assert len(curve.step) == len(curve.train_loss) == len(curve.val_score) == curve.steps_run // rule.eval_every
    # the kept weights are the best point of the curve, and score what the curve says
    assert curve.best_score == max(curve.val_score)
    assert curve.best_step == curve.step[int(np.argmax(curve.val_score))]
    assert mean_psnr(reconstruct(dec, feats[128:]), imgs[128:]) == pytest.approx(curve.best_score, abs=1e-5)
    assert not dec.training


def test_train_until_plateau_runs_to_the_cap_while_it_improves():
    w = torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.Module()
    model.w = w
    opt = torch.optim.SGD([w], lr=0.0)
    t = iter(range(1, 10_000))
    curve = train_until_plateau(model, opt, lambda: 0.0, lambda: float(next(t)), StopRule(max_steps=25, eval_every=10))
    assert not curve.stopped_early and curve.step == [10, 20, 25] and curve.best_step == 25


def test_strong_decoder_inverts_a_linear_patch_encoding_and_is_deterministic():
    feats, imgs = _patches(400, 0)
    rule = StopRule(max_steps=100, eval_every=25, patience=3, lr_drops=1)
    budget = StrongDecoderBudget(stop=rule, batch=16, lr=3e-3, width=8, depth=1)
    dec, curve = fit_strong_decoder(feats[:300], imgs[:300], feats[300:350], imgs[300:350], budget, seed=1)
    psnr, _ = image_metrics(reconstruct(dec, feats[350:]), imgs[350:])
    base, _ = image_metrics(imgs[:300].mean(0, keepdim=True).expand(50, -1, -1, -1), imgs[350:])
    assert psnr.mean() > base.mean() + 8
    # torch's PSNR used for early stopping is scikit-image's
    val_psnr, _ = image_metrics(reconstruct(dec, feats[300:350]), imgs[300:350])
    assert val_psnr.mean() == pytest.approx(curve.best_score, abs=1e-3)
    again, curve2 = fit_strong_decoder(feats[:300], imgs[:300], feats[300:350], imgs[300:350], budget, seed=1)
    assert curve2.val_score == curve.val_score
    assert all(torch.equal(a, b) for a, b in zip(dec.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize(("tokens", "size", "depth"), [(64, 32, 2), (16, 16, 2), (4, 28, 1), (256, 224, 2)])
def test_unet_decoder_shapes(tokens, size, depth):
    dec = UNetDecoder(12, tokens, size, width=8, depth=depth)
    assert dec(torch.randn(2, tokens, 12)).shape == (2, 3, size, size)
    with pytest.raises(ValueError, match="square grid"):
        UNetDecoder(12, tokens + 1, size)


# ----------------------------------------------------------------------------- text reader
def test_text_decoder_reads_noisy_embeddings_back():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(12, 8, generator=g)
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 12, size=rng.integers(3, 7)) for _ in range(240)]
    vecs = [table[torch.from_numpy(i)] + 0.2 * torch.randn(len(i), 8, generator=g) for i in ids]
    rule = StopRule(max_steps=2000, eval_every=20, patience=3, min_delta=0.001, lr_drops=1)
    budget = TextDecoderBudget(stop=rule, batch=32, lr=3e-3, hidden=32)
    dec, curve = fit_text_decoder(vecs[:160], ids[:160], vecs[160:200], ids[160:200], 12, budget, seed=0)
    assert curve.stopped_early and curve.best_score == max(curve.val_score)
    assert token_accuracy(dec, vecs[160:200], ids[160:200]) == pytest.approx(curve.best_score)
    assert token_accuracy(dec, vecs[200:], ids[200:]) > 0.95
    assert dec.read(vecs[200]).shape == ids[200].shape and (dec.read(vecs[200]) == ids[200]).mean() > 0.5
    again, _ = fit_text_decoder(vecs[:160], ids[:160], vecs[160:200], ids[160:200], 12, budget, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(dec.state_dict().values(), again.state_dict().values()))


# ----------------------------------------------------------------------------- FORA-aligned surrogate
def test_surrogate_alignment_is_off_at_zero_weight_and_changes_the_surrogate(tmp_path):
    from experiments.privacy_attacks import public_pool
    from sim.training.server import build_server, initial_client_weights

    cfg = scratch_cfg(dataset="faces", num_samples=40, hidden_size=32, image_size=16, patch_size=4, batch_size=4,
                      compressor="rdfsq", bits=2, out_dir=str(tmp_path), run_name="run")
    server, weights, aux = build_server(cfg), initial_client_weights(cfg), public_pool(cfg, 16)
    target = torch.randn(10, cfg.num_image_tokens, cfg.hidden_size)
    budget = SurrogateBudget(steps=2, batch=4, lr=1e-3)

    def state(**kw):
        return surrogate_client(cfg, server, aux, weights, budget, seed=5, **kw).state_dict()

    plain, off, on = state(), state(align_to=target, mmd_weight=0.0), state(align_to=target, mmd_weight=1.0)
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    assert any(not torch.equal(plain[k], on[k]) for k in plain)
    assert all(torch.equal(on[k], v) for k, v in state(align_to=target, mmd_weight=1.0).items())  # seeded
