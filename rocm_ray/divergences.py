"""Divergences between the Gaussian step kernels of a consistency sampler.

Regularized ROCM ("ROCM: RLHF on consistency models", Shekhar & Zhang, arXiv 2503.06171) adds
``beta * sum_n D(pi_theta(.|x_n) || pi_ref(.|x_n))`` to the reward loss. Each step kernel is an isotropic
Gaussian, and the policy and reference kernels share the covariance ``var * I``, so every f-divergence
between them is a scalar function ``g`` of the Mahalanobis distance

    delta = ||mean_p - mean_q|| / sigma,        sigma^2 = var

(the problem reduces to 1-D along the mean difference). This module implements ``g`` for each divergence,
written as a function of ``delta^2`` where a closed form exists, and two reductions:

* ``"sum"``: the divergence between the full multivariate Gaussians, ``g(||dmu||^2 / var)``;
* ``"mean"``: the average over dimensions of the divergence between the 1-D marginals,
  ``mean_i g(dmu_i^2 / var)``.

Derivations, the choice of reduction and the numerical treatment are in ``docs/math.md``.
Only torch, numpy and the standard library are imported here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["DIVERGENCES", "REDUCTIONS", "gaussian_divergence", "chi2_threshold"]

DIVERGENCES: tuple[str, ...] = ("kl", "reverse_kl", "js", "hellinger", "chi2", "tv", "fisher", "w2", "none")
REDUCTIONS: tuple[str, ...] = ("sum", "mean")

_LOG2 = math.log(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# Jensen-Shannon quadrature: Gauss-Legendre nodes on [0, _JS_T] for a smooth, exponentially decaying
# integrand (see _js_value_and_grad). 64 nodes on [0, 40] give |error| < 2e-14 in value and derivative
# for delta in [0, 60] against 30-digit mpmath; beyond _JS_DELTA_MAX, JS = log 2 to double precision.
_JS_NODES = 64
_JS_T = 40.0
_JS_DELTA_MAX = 60.0
_JS_CHUNK = 1 << 18


def gaussian_divergence(
    name: str,
    mean_p: Tensor,
    mean_q: Tensor,
    var: float | Tensor,
    reduction: str = "sum",
) -> Tensor:
    """Divergence ``D(p || q)`` between ``p = N(mean_p, var I)`` and ``q = N(mean_q, var I)``, per sample.

    Args:
        name: one of :data:`DIVERGENCES`:
            ``kl`` = E_p log(p/q) = delta^2/2; ``reverse_kl`` = E_q log(q/p) (equal here);
            ``js`` = KL(p||m)/2 + KL(q||m)/2 with m = (p+q)/2 (quadrature, see below);
            ``hellinger`` = squared Hellinger 1 - integral sqrt(pq) = 1 - exp(-delta^2/8);
            ``chi2`` = integral (p-q)^2/q = exp(delta^2) - 1 (with a linear continuation, see below);
            ``tv`` = (1/2) integral |p-q| = erf(delta / (2 sqrt 2));
            ``fisher`` = E_p ||grad log p - grad log q||^2 = ||dmu||^2 / var^2;
            ``w2`` = 2-Wasserstein distance ||dmu||; ``none`` = zeros.
        mean_p: means of p, ``[B, ...]``.
        mean_q: means of q, same shape as ``mean_p``.
        var: the shared variance sigma^2 (positive): a python number, a 0-d tensor or a ``[B]`` tensor.
        reduction: ``"sum"`` for the divergence of the full Gaussians; ``"mean"`` for the average over
            dimensions of the divergence of the 1-D marginals (``fisher``: mean of dmu_i^2 / var^2;
            ``w2``: mean of |dmu_i|). ``sum == d * mean`` only for ``kl``, ``reverse_kl`` and ``fisher``.

    Returns:
        ``[B]`` tensor on the device of the means, differentiable w.r.t. the means and ``var``, with a zero
        (never NaN) gradient where the means coincide. Half-precision means are computed in float32.

    ``chi2``: ``exp(delta^2) - 1`` overflows, so it is exact (``expm1``) up to ``delta^2 = T`` and continued
    linearly with slope ``exp(T)`` beyond (value and gradient continuous), with ``T = chi2_threshold(dtype)
    = log(finfo(dtype).max) / 2`` (44.36 in float32, 354.89 in float64): value and gradient stay finite
    while ``delta^2 < exp(T)`` (1.8e19 in float32).

    ``js``: no closed form; ``JS(delta) = log 2 - E_{x~N(0,1)} softplus(delta x - delta^2/2)`` is split into
    a closed-form ReLU part and a smooth remainder integrated by 64-node Gauss-Legendre quadrature, in
    float64 (float32 on MPS); the derivative comes from the same quadrature (first-order autograd only).

    Raises:
        ValueError: unknown ``name`` or ``reduction``, mismatched shapes, bad ``var`` shape or value.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; allowed: {', '.join(DIVERGENCES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    if mean_p.shape != mean_q.shape:
        raise ValueError(
            f"mean_p and mean_q must have the same shape, got mean_p {tuple(mean_p.shape)} "
            f"and mean_q {tuple(mean_q.shape)}"
        )
    if mean_p.dim() == 0 or math.prod(mean_p.shape[1:]) == 0:
        raise ValueError(
            f"means must be [B, ...] with at least one element per sample, got {tuple(mean_p.shape)}"
        )
    if not (mean_p.is_floating_point() and mean_q.is_floating_point()):
        raise ValueError(f"means must be floating point, got {mean_p.dtype} and {mean_q.dtype}")

    dmu = mean_p - mean_q  # [B, ...]
    if dmu.dtype in (torch.float16, torch.bfloat16):
        dmu = dmu.float()
    batch = dmu.shape[0]
    var_b = _batch_var(var, batch, dmu)  # [B]
    dmu = dmu.flatten(1)  # [B, D]

    if name == "none":
        return dmu[:, :0].sum(1)  # [B] zeros, attached to the graph
    sq = dmu.square()  # [B, D]
    if name == "fisher":
        per = sq.sum(1) if reduction == "sum" else sq.mean(1)  # [B]
        return per / var_b.square()
    if name == "w2":
        if reduction == "sum":
            return _safe_sqrt(sq.sum(1))  # [B]
        return dmu.abs().mean(1)  # [B]

    g = _G[name]
    if reduction == "sum":
        return g(sq.sum(1) / var_b)  # [B]
    return g(sq / var_b[:, None]).mean(1)  # [B, D] -> [B]


def chi2_threshold(dtype: torch.dtype) -> float:
    """``delta^2`` above which ``chi2`` switches from ``expm1(delta^2)`` to its tangent line."""
    return 0.5 * math.log(torch.finfo(dtype).max)


# ----------------------------------------------------------------------------------------------------
# g(delta^2) for each divergence of two Gaussians with a shared isotropic covariance


def _kl(s: Tensor) -> Tensor:
    return 0.5 * s


def _hellinger(s: Tensor) -> Tensor:
    return -torch.expm1(-0.125 * s)


def _chi2(s: Tensor) -> Tensor:
    # exp(s) - 1 for s <= T, expm1(T) + exp(T) (s - T) beyond: C1, finite for s < exp(T).
    s_c = s.clamp(max=chi2_threshold(s.dtype))
    return torch.expm1(s_c) + torch.exp(s_c) * (s - s_c)


def _tv(s: Tensor) -> Tensor:
    return torch.erf(_safe_sqrt(s) * (0.5 / math.sqrt(2.0)))


def _js(s: Tensor) -> Tensor:
    delta = _safe_sqrt(s.clamp(max=_JS_DELTA_MAX**2))
    return _JensenShannon.apply(delta)


_G: dict[str, Callable[[Tensor], Tensor]] = {
    "kl": _kl,
    "reverse_kl": _kl,
    "js": _js,
    "hellinger": _hellinger,
    "chi2": _chi2,
    "tv": _tv,
}


# ----------------------------------------------------------------------------------------------------
# Jensen-Shannon by quadrature
#
# With u = delta x - delta^2/2 (the log-likelihood ratio), JS = log 2 - E_{x~N(0,1)} softplus(u).
# softplus(u) = relu(u) + softplus(-|u|); E relu(u) = delta phi(delta/2) - (delta^2/2) Phi(-delta/2) in
# closed form, and folding the kink x = delta/2 of the remainder gives
#     E softplus(-|u|) = R(delta) = 2 exp(-delta^2/8) int_0^inf h(delta y) phi(y) dy,
#     h(v) = log1p(exp(-v)) cosh(v/2)      (smooth, h(0) = log 2, h(v) ~ exp(-v/2)/2).
# With y = t / (1 + delta) the integrand in t decays like a Gaussian for small delta and like
# exp(-t/2) for large delta, so one fixed Gauss-Legendre rule on [0, 40] serves all delta.
# log 2 is multiplied by C0 = 2 int_0^40 phi by the same rule, which makes JS(0) = 0 exactly.


@functools.lru_cache(maxsize=32)
def _js_rule(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, float]:
    x, w = np.polynomial.legendre.leggauss(_JS_NODES)
    t = (x + 1.0) * (_JS_T / 2.0)
    w = w * (_JS_T / 2.0)
    c0 = float(2.0 * np.sum(w * np.exp(-0.5 * t * t)) * _INV_SQRT_2PI)
    return torch.tensor(t, dtype=dtype, device=device), torch.tensor(w, dtype=dtype, device=device), c0


def _js_value_and_grad(delta: Tensor) -> tuple[Tensor, Tensor]:
    """JS(delta) and dJS/ddelta, elementwise, for delta in [0, 60]."""
    t, w, c0 = _js_rule(delta.dtype, delta.device)  # [K], [K]
    s = delta.square()
    a = 1.0 / (1.0 + delta)
    v = (delta * a).unsqueeze(-1) * t  # [..., K]
    lp = torch.log1p(torch.exp(-v))
    ch = torch.cosh(0.5 * v)
    h = lp * ch
    dh = 0.5 * lp * torch.sinh(0.5 * v) - ch * torch.sigmoid(-v)  # h'(v)
    wphi = w * torch.exp(-0.5 * (a.unsqueeze(-1) * t).square()) * _INV_SQRT_2PI  # [..., K]
    integral = a * (wphi * h).sum(-1)  # [...]
    integral_d = a.square() * (wphi * t * dh).sum(-1)  # [...]
    e = torch.exp(-0.125 * s)
    rem = 2.0 * e * integral
    rem_d = -0.25 * delta * rem + 2.0 * e * integral_d
    cdf = torch.special.ndtr(-0.5 * delta)
    relu = delta * e * _INV_SQRT_2PI - 0.5 * s * cdf
    relu_d = e * _INV_SQRT_2PI - delta * cdf
    return (_LOG2 * c0 - relu - rem).clamp(min=0.0), -relu_d - rem_d


class _JensenShannon(torch.autograd.Function):
    """JS(delta) with its derivative from the same quadrature; saves only [..]-sized tensors."""

    @staticmethod
    def forward(ctx, delta: Tensor) -> Tensor:
        work = torch.float32 if delta.device.type == "mps" else torch.float64
        flat = delta.detach().reshape(-1).to(work)  # [M]
        # chunks bound the [chunk, K] quadrature temporaries (128 MiB each in float64)
        parts = [_js_value_and_grad(chunk) for chunk in flat.split(_JS_CHUNK)]
        value = torch.cat([v for v, _ in parts]).reshape(delta.shape)  # [...]
        grad = torch.cat([g for _, g in parts]).reshape(delta.shape)  # [...]
        ctx.save_for_backward(grad.to(delta.dtype))
        return value.to(delta.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> Tensor:
        (grad,) = ctx.saved_tensors
        return grad_out * grad


# ----------------------------------------------------------------------------------------------------
# helpers


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) gradient at 0."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def _batch_var(var: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """The variance as a [B] tensor with the dtype and device of ``like``."""
    if isinstance(var, Tensor):
        if var.dim() == 0:
            var = var.expand(batch)  # [B]
        elif var.shape != (batch,):
            raise ValueError(
                f"var must be a number, a 0-d tensor or a [B] = [{batch}] tensor, got {tuple(var.shape)}"
            )
        return var.to(dtype=like.dtype, device=like.device)
    var = float(var)
    if not var > 0.0 or math.isinf(var):
        raise ValueError(f"var must be a positive finite number, got {var}")
    return torch.full((batch,), var, dtype=like.dtype, device=like.device)
