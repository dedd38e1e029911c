"""Tests for rocm_ray.divergences against independent numerical integration of the definitions.

Reference values come from scipy.integrate (quad / dblquad) applied to the textbook integral definitions
of each divergence between N(0, sigma^2) and N(dmu, sigma^2): no formula from the module is reused.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from rocm_ray.divergences import DIVERGENCES, chi2_threshold, gaussian_divergence

F_DIVS = ("kl", "reverse_kl", "js", "hellinger", "chi2", "tv")
SIGMA = 0.7  # reference integrals use this scale, so var != 1 is exercised everywhere

# ----------------------------------------------------------------------------------------------------
# independent 1-D references: p = N(0, SIGMA^2), q = N(dmu, SIGMA^2)


_LOG_NORM = math.log(SIGMA * math.sqrt(2.0 * math.pi))


def _logpdf(x: float, mean: float) -> float:
    """log N(x; mean, SIGMA^2) (plain math: scipy.stats per-point calls are slow inside quad)."""
    return -0.5 * ((x - mean) / SIGMA) ** 2 - _LOG_NORM


def _integrand(name: str, dmu: float):
    def lp(x):
        return _logpdf(x, 0.0)

    def lq(x):
        return _logpdf(x, dmu)

    def kl(x):
        return math.exp(lp(x)) * (lp(x) - lq(x))

    def reverse_kl(x):
        return math.exp(lq(x)) * (lq(x) - lp(x))

    def js(x):
        a, b = lp(x), lq(x)
        lm = max(a, b) + math.log1p(math.exp(-abs(a - b))) - math.log(2.0)
        return 0.5 * math.exp(a) * (a - lm) + 0.5 * math.exp(b) * (b - lm)

    def hellinger(x):  # 1 - BC = (1/2) int (sqrt p - sqrt q)^2
        return 0.5 * (math.exp(0.5 * lp(x)) - math.exp(0.5 * lq(x))) ** 2

    def chi2(x):
        return (math.exp(lp(x)) - math.exp(lq(x))) ** 2 * math.exp(-lq(x))

    def tv(x):
        return 0.5 * abs(math.exp(lp(x)) - math.exp(lq(x)))

    def fisher(x):  # E_p (d/dx log p - d/dx log q)^2
        score_p = -x / SIGMA**2
        score_q = -(x - dmu) / SIGMA**2
        return math.exp(lp(x)) * (score_p - score_q) ** 2

    return locals()[name]


@functools.cache
def quad_reference(name: str, delta: float) -> float:
    """D(N(0, SIGMA^2) || N(delta SIGMA, SIGMA^2)) by adaptive quadrature of the 1-D definition."""
    dmu = delta * SIGMA
    if name == "w2":  # W2 = (int_0^1 (F_p^-1(u) - F_q^-1(u))^2 du)^(1/2)
        f = stats.norm(0.0, SIGMA).ppf
        g = stats.norm(dmu, SIGMA).ppf
        val, _ = integrate.quad(lambda u: (f(u) - g(u)) ** 2, 0.0, 1.0, epsabs=1e-13, limit=200)
        return math.sqrt(val)
    lo, hi = min(0.0, -dmu) - 12 * SIGMA, max(0.0, dmu) + 12 * SIGMA  # chi2's integrand peaks at -dmu
    pts = sorted({-dmu, 0.0, dmu / 2, dmu})
    val, _ = integrate.quad(_integrand(name, dmu), lo, hi, points=pts, epsabs=1e-13, epsrel=1e-12, limit=400)
    return val


def _one_dim(name: str, delta: float, reduction: str = "sum", dtype=torch.float64) -> float:
    mean_p = torch.zeros(1, 1, dtype=dtype)
    mean_q = torch.full((1, 1), delta * SIGMA, dtype=dtype)
    return gaussian_divergence(name, mean_p, mean_q, SIGMA**2, reduction).item()


DELTAS = (0.0, 1e-3, 0.5, 2.0, 5.0, 12.0, 30.0)
CASES = [(n, d) for n in ("kl", "reverse_kl", "js", "hellinger", "tv", "fisher", "w2") for d in DELTAS]
CASES += [("chi2", d) for d in (0.0, 1e-3, 0.5, 1.5, 3.0)]  # exp(9): quad stays accurate


@pytest.mark.parametrize(("name", "delta"), CASES)
def test_one_dim_matches_quadrature(name: str, delta: float) -> None:
    ref = quad_reference(name, delta)
    got = _one_dim(name, delta)
    assert got == pytest.approx(ref, rel=1e-8, abs=1e-10)


def test_js_accuracy_over_range() -> None:
    """JS value and derivative within 1e-9 of quadrature for delta in [0, 60] (spec: 1e-6)."""
    deltas = np.concatenate([[0.0, 1e-6, 1e-2], np.linspace(0.1, 14.0, 19), [20.0, 40.0, 60.0, 80.0]])
    delta = torch.tensor(deltas, dtype=torch.float64, requires_grad=True)
    mean_p = delta[:, None] * SIGMA  # [M, 1]
    js = gaussian_divergence("js", mean_p, torch.zeros_like(mean_p), SIGMA**2)
    (grad,) = torch.autograd.grad(js.sum(), delta)

    def dref(d: float) -> float:  # dJS/ddelta = -E_{x~N(0,1)} sigmoid(d x - d^2/2) (x - d)
        def f(x):
            return -math.exp(-np.logaddexp(0.0, -(d * x - d * d / 2))) * (x - d) * stats.norm.pdf(x)

        return integrate.quad(f, -12.0, d + 12.0, points=[0.0, d / 2, d], epsabs=1e-13, limit=400)[0]

    ref = np.array([quad_reference("js", d) for d in deltas])
    dgrad = np.array([dref(d) for d in deltas])
    assert np.abs(js.detach().numpy() - ref).max() < 1e-9
    assert np.abs(grad.numpy() - dgrad).max() < 1e-9
    assert js[0].item() == 0.0
    assert js[-1].item() == pytest.approx(math.log(2.0), abs=1e-12)


@pytest.mark.parametrize("name", F_DIVS + ("fisher", "w2"))
def test_sum_reduces_to_one_dim_along_mean_difference(name: str) -> None:
    """Full Gaussians in 5-D: the divergence is the 1-D one at the Mahalanobis distance."""
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True)
    deltas = (0.8, 2.5) if name == "chi2" else (0.8, 4.0)
    mean_p = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    mean_q = mean_p + torch.tensor(deltas, dtype=torch.float64)[:, None] * SIGMA * direction  # [2, 5]
    got = gaussian_divergence(name, mean_p, mean_q, SIGMA**2)
    ref = [quad_reference(name, d) for d in deltas]
    assert got.tolist() == pytest.approx(ref, rel=1e-8, abs=1e-10)


@functools.cache
def _dblquad_reference(name: str) -> float:
    """A 2-D case by 2-D quadrature of the definition: p = N(0, s^2 I), q = N((0.6, -0.9), s^2 I)."""
    mq = (0.6, -0.9)

    def f(y, x):
        a = _logpdf(x, 0.0) + _logpdf(y, 0.0)
        b = _logpdf(x, mq[0]) + _logpdf(y, mq[1])
        if name == "kl":
            return math.exp(a) * (a - b)
        if name == "js":
            lm = max(a, b) + math.log1p(math.exp(-abs(a - b))) - math.log(2.0)
            return 0.5 * math.exp(a) * (a - lm) + 0.5 * math.exp(b) * (b - lm)
        if name == "hellinger":
            return 0.5 * (math.exp(0.5 * a) - math.exp(0.5 * b)) ** 2
        if name == "chi2":
            return (math.exp(a) - math.exp(b)) ** 2 * math.exp(-b)
        return 0.5 * abs(math.exp(a) - math.exp(b))  # tv

    lim = 8 * SIGMA + 1.0
    val, _ = integrate.dblquad(f, -lim, lim, -lim, lim, epsabs=1e-9, epsrel=1e-9)
    return val


@pytest.mark.parametrize("name", ("kl", "js", "hellinger", "chi2", "tv"))
def test_two_dim_matches_dblquad(name: str) -> None:
    mean_p = torch.zeros(1, 2, dtype=torch.float64)
    mean_q = torch.tensor([[0.6, -0.9]], dtype=torch.float64)
    got = gaussian_divergence(name, mean_p, mean_q, SIGMA**2).item()
    assert got == pytest.approx(_dblquad_reference(name), rel=1e-6, abs=1e-8)


# ----------------------------------------------------------------------------------------------------
# reductions


def _pair(shape=(3, 2, 4), scale: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mean_p = torch.randn(*shape, generator=gen, dtype=torch.float64)
    mean_q = mean_p + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
    return mean_p, mean_q


@pytest.mark.parametrize("name", DIVERGENCES)
def test_mean_reduction_is_average_of_marginals(name: str) -> None:
    mean_p, mean_q = _pair()
    var = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    got = gaussian_divergence(name, mean_p, mean_q, var, reduction="mean")
    flat_p, flat_q = mean_p.flatten(1), mean_q.flatten(1)  # [3, 8]
    per_dim = [gaussian_divergence(name, flat_p[:, i : i + 1], flat_q[:, i : i + 1], var) for i in range(8)]
    manual = torch.stack(per_dim, 1).mean(1)  # [3]
    torch.testing.assert_close(got, manual, rtol=1e-12, atol=1e-14)


def test_sum_is_d_times_mean_only_for_quadratic_divergences() -> None:
    mean_p, mean_q = _pair(scale=0.5)
    d = mean_p[0].numel()
    for name in DIVERGENCES:
        total = gaussian_divergence(name, mean_p, mean_q, 0.8, "sum")
        mean = gaussian_divergence(name, mean_p, mean_q, 0.8, "mean")
        if name in ("kl", "reverse_kl", "fisher", "none"):
            torch.testing.assert_close(total, d * mean)
        else:
            assert not torch.allclose(total, d * mean), name


# ----------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("reduction", ("sum", "mean"))
@pytest.mark.parametrize("var_kind", ("float", "tensor"))
@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradcheck(name: str, reduction: str, var_kind: str) -> None:
    mean_p, mean_q = _pair(shape=(2, 3), scale=0.7, seed=1)
    mean_p.requires_grad_(True)
    mean_q.requires_grad_(True)
    if var_kind == "float":
        inputs = (mean_p, mean_q)

        def fn(p, q):
            return gaussian_divergence(name, p, q, 0.6, reduction)

    else:
        var = torch.tensor([0.6, 1.3], dtype=torch.float64, requires_grad=True)
        inputs = (mean_p, mean_q, var)

        def fn(p, q, v):
            return gaussian_divergence(name, p, q, v, reduction)

    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_chi2_linear_continuation() -> None:
    """Past the threshold (delta^2 ~ 400 > 354.9 in float64) chi2 stays differentiable."""
    mean_p = torch.tensor([[20.0, 1.0]], dtype=torch.float64, requires_grad=True)
    mean_q = torch.tensor([[0.0, 0.5]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, q: gaussian_divergence("chi2", p, q, 1.0), (mean_p, mean_q))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_chi2_finite_at_large_delta(dtype: torch.dtype) -> None:
    t = chi2_threshold(dtype)
    mean_p = torch.tensor([[100.0]], dtype=dtype, requires_grad=True)  # delta^2 = 1e4
    value = gaussian_divergence("chi2", mean_p, torch.zeros_like(mean_p), 1.0)
    (grad,) = torch.autograd.grad(value.sum(), mean_p)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    expected = math.expm1(t) + math.exp(t) * (1e4 - t)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert grad.item() == pytest.approx(math.exp(t) * 2 * 100.0, rel=1e-5)  # d/dmu of s = mu^2


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_chi2_continuous_at_threshold(dtype: torch.dtype) -> None:
    t = chi2_threshold(dtype)
    s = torch.tensor([t * (1 - 1e-6), t * (1 + 1e-6)], dtype=torch.float64)
    mean_p = s.sqrt().to(dtype)[:, None].requires_grad_(True)  # [2, 1]
    value = gaussian_divergence("chi2", mean_p, torch.zeros_like(mean_p), 1.0)
    (grad,) = torch.autograd.grad(value.sum(), mean_p)
    slope = grad[:, 0] / (2 * mean_p[:, 0])  # d value / d delta^2 on both sides
    torch.testing.assert_close(value[0] / value[1], torch.ones((), dtype=dtype), rtol=1e-3, atol=0)
    torch.testing.assert_close(slope[0] / slope[1], torch.ones((), dtype=dtype), rtol=1e-3, atol=0)
    assert chi2_threshold(torch.float64) == pytest.approx(354.89, abs=0.01)
    assert chi2_threshold(torch.float32) == pytest.approx(44.36, abs=0.01)


@pytest.mark.parametrize("reduction", ("sum", "mean"))
@pytest.mark.parametrize("name", DIVERGENCES)
def test_no_nan_gradient_at_identical_means(name: str, reduction: str) -> None:
    mean_p = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(2), requires_grad=True)
    mean_q = mean_p.detach().clone().requires_grad_(True)
    var = torch.tensor([0.5, 2.0], requires_grad=True)
    value = gaussian_divergence(name, mean_p, mean_q, var, reduction)
    assert value.shape == (2,)
    torch.testing.assert_close(value, torch.zeros(2), atol=1e-7, rtol=0)
    value.sum().backward()
    grads = (mean_p.grad, mean_q.grad) if name in ("w2", "none") else (mean_p.grad, mean_q.grad, var.grad)
    for grad in grads:  # w2 and none do not depend on var
        assert grad is not None and torch.isfinite(grad).all()
        torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# dtypes, devices, shapes, errors


def test_float32_matches_float64() -> None:
    mean_p, mean_q = _pair(shape=(4, 6), scale=0.3)
    for name in DIVERGENCES:
        for reduction in ("sum", "mean"):
            v64 = gaussian_divergence(name, mean_p, mean_q, 0.5, reduction)
            v32 = gaussian_divergence(name, mean_p.float(), mean_q.float(), 0.5, reduction)
            assert v32.dtype == torch.float32
            torch.testing.assert_close(v32.double(), v64, rtol=1e-4, atol=1e-6)


def test_half_precision_is_computed_in_float32() -> None:
    mean_p, mean_q = _pair(shape=(2, 5), scale=0.3)
    value = gaussian_divergence("js", mean_p.bfloat16(), mean_q.bfloat16(), 0.5, "mean")
    assert value.dtype == torch.float32 and torch.isfinite(value).all()


def test_none_is_zero_and_keeps_graph() -> None:
    mean_p = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    value = gaussian_divergence("none", mean_p, torch.zeros(3, 4, dtype=torch.float64), 1.0)
    assert value.dtype == torch.float64 and value.shape == (3,) and value.grad_fn is not None
    assert (value == 0).all()
    value.sum().backward()
    assert (mean_p.grad == 0).all()


def test_var_forms_agree() -> None:
    mean_p, mean_q = _pair(shape=(2, 3, 2))
    a = gaussian_divergence("hellinger", mean_p, mean_q, 0.5)
    b = gaussian_divergence("hellinger", mean_p, mean_q, torch.tensor(0.5, dtype=torch.float64))
    c = gaussian_divergence("hellinger", mean_p, mean_q, torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_unknown_name_lists_allowed() -> None:
    mean_p, mean_q = _pair()
    with pytest.raises(ValueError, match="unknown divergence 'kld'") as err:
        gaussian_divergence("kld", mean_p, mean_q, 1.0)
    for name in DIVERGENCES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_divergence("kl", mean_p, mean_q, 1.0, reduction="max")


def test_shape_errors_name_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        gaussian_divergence("kl", torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        gaussian_divergence("kl", torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        gaussian_divergence("kl", torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match=r"\[B, \.\.\.\]"):
        gaussian_divergence("kl", torch.zeros(()), torch.zeros(()), 1.0)


def test_divergence_names() -> None:
    assert DIVERGENCES == ("kl", "reverse_kl", "js", "hellinger", "chi2", "tv", "fisher", "w2", "none")
