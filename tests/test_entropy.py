"""KDE entropy estimator against analytic entropies; per-dim/pooled features; discrete code entropy."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.stats import gaussian_kde, norm

from sim.compress.codecs.rdfsq import clip_and_scale
from sim.compress.entropy_estimate import (
    BatchEntropy, code_entropies, discrete_entropy_bits, entropy_over_batches, feature_entropies,
    kde_differential_entropy, recommended_bits,
)

torch.set_num_threads(1)

N = 5000  # the default max_points: every estimate below runs on the default configuration
GAUSS = 0.5 * math.log2(2 * math.pi * math.e)  # entropy of N(0, 1) in bits


def gauss_entropy(sigma: float) -> float:
    return GAUSS + math.log2(sigma)


def mixture_pdf(t):
    return 0.4 * norm.pdf(t, -1.5, 0.5) + 0.6 * norm.pdf(t, 1.0, 0.8)


def mixture_samples(rng, n):
    first = rng.random(n) < 0.4
    return np.where(first, rng.normal(-1.5, 0.5, n), rng.normal(1.0, 0.8, n))


def quad_entropy(pdf, lo: float, hi: float) -> float:
    """Independent reference: ``-int p log2 p`` by adaptive quadrature."""
    value, abserr = integrate.quad(lambda t: -pdf(t) * math.log2(pdf(t)) if pdf(t) > 0 else 0.0, lo, hi, limit=400)
    assert abserr < 1e-8
    return value


def assert_close(estimate: float, truth: float) -> None:
    """Within 2% relative, or 0.02 bits where the true entropy is near 0."""
    assert abs(estimate - truth) <= max(0.02 * abs(truth), 0.02), (estimate, truth)


class TestKDEAgainstKnownEntropies:
    @pytest.mark.parametrize("sigma", [1.0, 0.1])
    def test_gaussian(self, sigma):
        x = np.random.default_rng(0).normal(0.0, sigma, N)
        assert_close(kde_differential_entropy(x), gauss_entropy(sigma))

    def test_small_gaussian_has_negative_entropy(self):
        x = np.random.default_rng(0).normal(0.0, 0.1, N)
        assert kde_differential_entropy(x) < 0

    def test_uniform_with_known_support(self):
        x = np.random.default_rng(0).uniform(-1.0, 3.0, N)
        assert_close(kde_differential_entropy(x, support=(-1.0, 3.0)), 2.0)

    def test_uniform_without_support_is_biased_high_by_the_boundary(self):
        # the paper's plain KDE leaks mass past the edges: ~+0.075 bits at n = 5000
        x = np.random.default_rng(0).uniform(-1.0, 3.0, N)
        assert 0.04 < kde_differential_entropy(x) - 2.0 < 0.11

    def test_gaussian_mixture_against_quadrature(self):
        truth = quad_entropy(mixture_pdf, -15.0, 15.0)
        assert 2.2 < truth < 2.5  # between the components' entropies + 1 bit of mixing
        x = mixture_samples(np.random.default_rng(0), N)
        assert_close(kde_differential_entropy(x), truth)

    def test_quadrature_reference_reproduces_a_gaussian(self):
        assert quad_entropy(lambda t: norm.pdf(t, 0.0, 0.1), -2.0, 2.0) == pytest.approx(gauss_entropy(0.1), abs=1e-9)


class TestKDEProperties:
    def test_paper_bandwidth_is_scipys_silverman_factor(self):
        for n in (10, 1000, 12345):
            x = np.random.default_rng(n).standard_normal(n)
            std = x.std(ddof=1)
            kde = gaussian_kde(x, "silverman")
            paper = (4 / 3) ** (1 / 5) * std * n ** (-1 / 5)
            assert kde.factor * std == pytest.approx(paper, rel=1e-12)
            assert math.sqrt(kde.covariance[0, 0]) == pytest.approx(paper, rel=1e-12)

    def test_paper_and_silverman_options_agree(self):
        x = np.random.default_rng(0).standard_normal(500)
        assert kde_differential_entropy(x, "paper") == kde_differential_entropy(x, "silverman")
        assert kde_differential_entropy(x, "scott") != kde_differential_entropy(x, "paper")

    def test_leave_one_out_matches_brute_force(self):
        x = np.random.default_rng(0).standard_normal(200)
        h = math.sqrt(gaussian_kde(x, "silverman").covariance[0, 0])
        diff = (x[:, None] - x[None, :]) / h
        kernel = np.exp(-0.5 * diff**2) / (math.sqrt(2 * math.pi) * h)
        np.fill_diagonal(kernel, 0.0)
        brute = -np.log2(kernel.sum(1) / (x.size - 1)).mean()
        assert kde_differential_entropy(x) == pytest.approx(brute, abs=1e-12)

    @pytest.mark.parametrize("a", [1e-3, 0.25, 3.0, 1000.0])
    def test_scaling_law(self, a):
        # the bandwidth scales with the std, so H(aX) = H(X) + log2 a holds to round-off
        x = mixture_samples(np.random.default_rng(1), 3000)
        assert kde_differential_entropy(a * x) == pytest.approx(kde_differential_entropy(x) + math.log2(a), abs=1e-9)

    def test_subsampling_is_deterministic_for_a_fixed_seed(self):
        x = np.random.default_rng(2).standard_normal(200_000)
        first = kde_differential_entropy(x, max_points=2000, seed=7)
        assert kde_differential_entropy(x, max_points=2000, seed=7) == first
        assert kde_differential_entropy(x, max_points=2000, seed=8) != first
        assert abs(first - GAUSS) < 0.05

    def test_torch_and_numpy_inputs_agree(self):
        x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
        assert kde_differential_entropy(torch.from_numpy(x)) == kde_differential_entropy(x)

    def test_isolated_outlier_stays_finite(self):
        x = np.append(np.random.default_rng(0).standard_normal(2000), 60.0)
        assert math.isfinite(kde_differential_entropy(x))


class TestBadInput:
    @pytest.mark.parametrize(
        ("samples", "kwargs", "match"),
        [
            ([], {}, "at least 2 samples"),
            ([1.0], {}, "at least 2 samples"),
            ([0.0, float("nan"), 1.0], {}, "NaN/inf"),
            ([0.0, float("inf"), 1.0], {}, "NaN/inf"),
            ([2.0] * 10, {}, "constant"),
            (np.zeros((5, 2)), {}, "1-D"),
            ([0.0, 1.0, 2.0], {"bandwidth": "auto"}, "bandwidth must be one of"),
            ([0.0, 1.0, 2.0], {"bandwidth": -0.5}, "positive finite"),
            ([0.0, 1.0, 2.0], {"max_points": 1}, "max_points"),
            ([0.0, 1.0, 2.0], {"support": (0.0, 1.0)}, "outside support"),
            ([0.0, 1.0, 2.0], {"support": (2.0, 0.0)}, "lo < hi"),
        ],
    )
    def test_kde_rejects(self, samples, kwargs, match):
        with pytest.raises(ValueError, match=match):
            kde_differential_entropy(samples, **kwargs)

    def test_features_reject(self):
        with pytest.raises(ValueError, match=r"shape \(B, N, D\)"):
            feature_entropies(np.zeros((4, 3)))
        z = np.random.default_rng(0).standard_normal((2, 8, 3))
        z[..., 1] = 0.5
        with pytest.raises(ValueError, match="feature dimension 1: samples are constant"):
            feature_entropies(z)
        with pytest.raises(ValueError, match="at least one batch"):
            entropy_over_batches([])
        with pytest.raises(ValueError, match="batch 1: .*NaN"):
            entropy_over_batches([z[..., :1], np.full((2, 8, 1), np.nan)])

    def test_codes_reject(self):
        with pytest.raises(ValueError, match="out of range"):
            discrete_entropy_bits(np.array([0, 4]), 4)
        with pytest.raises(ValueError, match="integers"):
            discrete_entropy_bits(np.array([0.0, 1.0]), 4)
        with pytest.raises(ValueError, match="empty"):
            discrete_entropy_bits(np.array([], dtype=np.int64), 4)
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            code_entropies(np.array([0.0, 1.5]))
        with pytest.raises(ValueError, match="1..16"):
            code_entropies(np.array([0.0, 0.5]), bits=[0])
        with pytest.raises(ValueError, match="finite"):
            recommended_bits(float("nan"))


class TestFeatureEntropies:
    SIGMA = np.array([0.5, 0.75, 1.0, 1.5])
    MU = np.array([-1.0, 0.0, 0.5, 2.0])

    def features(self, seed: int, batch: int = 8, tokens: int = 256) -> torch.Tensor:
        z = np.random.default_rng(seed).standard_normal((batch, tokens, 4)) * self.SIGMA + self.MU
        return torch.from_numpy(z).float()

    def test_per_dim_and_pooled_match_known_distributions(self):
        ent = feature_entropies(self.features(0), max_points_per_dim=2048)
        assert isinstance(ent, BatchEntropy) and ent.per_dim.shape == (4,)
        for got, sigma in zip(ent.per_dim, self.SIGMA):  # 2048 values per dimension
            assert got == pytest.approx(gauss_entropy(sigma), abs=0.06)

        def pooled_pdf(t):  # all values together: an equal mixture of the four Gaussians
            return float(np.mean(norm.pdf(t, self.MU, self.SIGMA)))

        assert_close(ent.pooled, quad_entropy(pooled_pdf, -12.0, 12.0))
        assert ent.per_dim_mean == pytest.approx(ent.per_dim.mean())

    def test_numpy_input_and_token_subsampling(self):
        z = self.features(1, batch=4, tokens=128)
        assert feature_entropies(z).pooled == feature_entropies(z.numpy()).pooled
        small = feature_entropies(z, max_points_per_dim=100, seed=3)
        assert np.array_equal(small.per_dim, feature_entropies(z, max_points_per_dim=100, seed=3).per_dim)
        assert not np.array_equal(small.per_dim, feature_entropies(z).per_dim)

    def test_over_batches_summary(self):
        batches = [self.features(s, batch=2, tokens=128) for s in range(3)]
        summary = entropy_over_batches(batches)
        singles = [feature_entropies(b, seed=i) for i, b in enumerate(batches)]
        assert summary.num_batches == 3
        assert summary.pooled == tuple(s.pooled for s in singles)
        assert summary.pooled_mean == pytest.approx(np.mean([s.pooled for s in singles]))
        assert summary.pooled_std == pytest.approx(np.std([s.pooled for s in singles], ddof=1))
        assert summary.per_dim_mean_mean == pytest.approx(np.mean([s.per_dim_mean for s in singles]))
        assert 0 < summary.per_dim_mean_std < 0.2
        assert summary.recommended_bits == math.ceil(summary.pooled_mean)
        assert summary.recommended_bits_per_dim == math.ceil(summary.per_dim_mean_mean)
        assert summary.warning is None
        assert math.isnan(entropy_over_batches(batches[:1]).pooled_std)

    def test_negative_entropy_warns_and_clamps_the_bit_width(self):
        batches = [0.05 * self.features(s, batch=2, tokens=64) for s in range(2)]
        summary = entropy_over_batches(batches)
        assert summary.pooled_mean < 0
        assert summary.recommended_bits == 1
        assert "negative differential entropy" in summary.warning and "log2|a|" in summary.warning


class TestDiscreteEntropy:
    @pytest.mark.parametrize("bits", [1, 2, 3, 5])
    def test_uniform_codes_carry_b_bits(self, bits):
        codes = np.tile(np.arange(2**bits), 50)
        assert discrete_entropy_bits(codes, 2**bits) == pytest.approx(bits, abs=1e-12)
        assert discrete_entropy_bits(torch.from_numpy(codes), 2**bits) == pytest.approx(bits, abs=1e-12)

    def test_constant_codes_carry_nothing(self):
        assert discrete_entropy_bits(np.full(100, 3), 8) == 0.0

    def test_code_entropies_of_rdfsq_scaled_features(self):
        z = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 64, 16))).float()
        ent = code_entropies(clip_and_scale(z, "global"))
        assert sorted(ent) == [1, 2, 3, 4, 5]
        assert ent[1] == pytest.approx(1.0, abs=0.01)  # sign of a symmetric variable
        assert all(0 < ent[b] <= b for b in ent)
        assert all(ent[b] < ent[b + 1] for b in range(1, 5))

    def test_fine_grid_entropy_is_differential_entropy_minus_log_step(self):
        # H(codes) ~ h(X) - log2(Delta) with Delta = 2 / (K - 1) on [-1, 1]; sigma = 0.2 keeps clipping negligible
        x = np.random.default_rng(0).normal(0.0, 0.2, N)
        h = kde_differential_entropy(x, support=(-1.0, 1.0))
        for bits, got in code_entropies(x, bits=[4, 5]).items():
            assert got == pytest.approx(h - math.log2(2 / (2**bits - 1)), abs=0.03)
