"""NoPeek (``nopeek-weight``): the distance correlation against references, and its place in split training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sim.config import SplitConfig
from sim.model import ClientBatch, build_client_model, halves
from sim.model.nopeek import distance_correlation, nopeek_loss
from sim.settings import ConfigError
from sim.training.reference import run_reference


def reference_dcor(x: np.ndarray, z: np.ndarray) -> float:
    """Székely, Rizzo & Bakirov (2007), Definition 4, written out with loops in float64."""
    n = x.shape[0]
    x, z = x.reshape(n, -1).astype(np.float64), z.reshape(n, -1).astype(np.float64)

    def centred(v: np.ndarray) -> np.ndarray:
        d = np.array([[math.sqrt(sum((v[k, i] - v[l, i]) ** 2 for i in range(v.shape[1]))) for l in range(n)]
                      for k in range(n)])
        out = np.empty_like(d)
        for k in range(n):
            for l in range(n):
                out[k, l] = d[k, l] - d[k, :].mean() - d[:, l].mean() + d.mean()
        return out

    a, b = centred(x), centred(z)
    v2 = lambda p, q: sum(p[k, l] * q[k, l] for k in range(n) for l in range(n)) / n**2
    den = math.sqrt(v2(a, a) * v2(b, b))
    return math.sqrt(v2(a, b) / den) if den > 0 else 0.0


def _pair(seed: int, n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, 3, generator=g)
    z = torch.tanh(x.reshape(n, -1) @ torch.randn(6, 5, generator=g)) + 0.3 * torch.randn(n, 5, generator=g)
    return x, z


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_papers_formulas(seed):
    x, z = _pair(seed)
    ours = float(distance_correlation(x, z))
    assert ours == pytest.approx(reference_dcor(x.numpy(), z.numpy()), abs=1e-5)
    assert float(distance_correlation(x, z, squared=True)) == pytest.approx(ours**2, abs=1e-6)


def test_matches_dcor_package():
    dcor = pytest.importorskip("dcor")
    x, z = _pair(3, n=32)
    xs, zs = x.reshape(32, -1).double().numpy(), z.double().numpy()
    assert float(distance_correlation(x, z)) == pytest.approx(dcor.distance_correlation(xs, zs), abs=1e-5)
    assert float(distance_correlation(x, z, squared=True)) == pytest.approx(dcor.distance_correlation_sqr(xs, zs), abs=1e-5)


def test_properties():
    x, z = _pair(4, n=16)
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-5)
    base = float(distance_correlation(x, z))
    assert 0.0 <= base <= 1.0
    # scale and translation of either side (a large offset must not cancel away the distances)
    assert float(distance_correlation(3.0 * x + 1000.0, 0.01 * z - 5.0)) == pytest.approx(base, abs=1e-4)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2048, 2, generator=g), torch.randn(2048, 2, generator=g)
    assert float(distance_correlation(a, b)) < 0.1  # independent samples: dCor_n -> 0 (its bias is O(n^-1/2))
    assert float(distance_correlation(a, a**2)) > 0.3  # dependent, though uncorrelated


def test_degenerate_batches_are_safe():
    x = torch.rand(4, 6, requires_grad=True)
    assert float(distance_correlation(x[:1], x[:1])) == 0.0
    const = torch.ones(4, 6, requires_grad=True)
    dup = torch.cat([x[:2], x[:2]])  # coincident samples: zero distances off the diagonal
    for a, b in [(const, x), (x, dup)]:
        out = distance_correlation(a, b)
        out.backward()
        assert torch.isfinite(out) and all(torch.isfinite(t.grad).all() for t in (x, const) if t.grad is not None)
    assert float(distance_correlation(const, x).detach()) == 0.0
    with pytest.raises(ValueError, match="samples"):
        distance_correlation(x, x[:3])
    with pytest.raises(ValueError, match="nopeek-weight"):
        nopeek_loss(x, x, -1.0)


def test_negative_weight_is_a_config_error():
    with pytest.raises(ConfigError, match="nopeek-weight"):
        SplitConfig(nopeek_weight=-0.1)
    with pytest.raises(ConfigError, match="nopeek-weight"):
        SplitConfig.from_run_config({"nopeek-weight": "-1"})


def test_term_only_in_the_training_recompute(tiny_cfg):
    model = build_client_model(tiny_cfg.replace(nopeek_weight=2.0))
    batch = ClientBatch(torch.rand(4, 3, tiny_cfg.image_size, tiny_cfg.image_size))
    plain = float(model.codec(model.features(batch.pixels)).aux_loss)
    trained = model.encode(batch).image.aux_loss
    assert trained.requires_grad and float(trained.detach()) > plain
    with torch.no_grad():  # the encode for the wire
        assert float(model.encode(batch).image.aux_loss) == pytest.approx(plain)
    model.eval()  # evaluation
    assert float(model.encode(batch).image.aux_loss) == pytest.approx(plain)


def _run(cfg: SplitConfig):
    res = run_reference(cfg, 2, evaluate_rounds=False)
    return res.step_losses, res.client_weights, res.reports[-1].client_aux


def test_weight_changes_training(tiny_cfg):
    _, weights0, aux0 = _run(tiny_cfg)
    _, weights1, aux1 = _run(tiny_cfg.replace(nopeek_weight=1.0))
    assert aux1 > aux0
    assert any(not torch.equal(weights0[k], weights1[k]) for k in weights0)


def test_zero_weight_is_the_old_run(tiny_cfg, monkeypatch):
    absent = tiny_cfg.to_run_config()
    absent.pop("nopeek-weight")
    losses_absent, weights_absent, _ = _run(SplitConfig.from_run_config(absent))

    def never(*args, **kwargs):
        raise AssertionError("nopeek-weight=0 must not compute the NoPeek term")

    monkeypatch.setattr(halves, "nopeek_loss", never)
    losses_zero, weights_zero, _ = _run(tiny_cfg.replace(nopeek_weight=0.0))
    assert losses_zero == losses_absent
    assert all(torch.equal(weights_zero[k], weights_absent[k]) for k in weights_absent)
