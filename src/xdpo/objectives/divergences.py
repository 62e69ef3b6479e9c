"""Reward transforms r = f'(z) of the f-divergence family, as functions of the implicit log-ratio.

For a sample x with shared (t, eps): delta = e_theta(x) - e_ref(x) (per-sample denoising errors) and
log z = -s * delta (docs/math.md §1). Each transform maps log z to the implicit reward r = f'(z);
the logits of the outer loss are (beta / 2) * lambda(t) * (r_w - r_l) (docs/math.md §3).

| name       | f'(z)                          | source                                         |
|------------|--------------------------------|------------------------------------------------|
| reverse_kl | log z                          | Diffusion-DPO (Wallace et al. 2024)            |
| xdpo       | eta log z - gamma z^(-n)       | xDPO, Zhang & Xiang 2025, Appendix C (trained) |
| xdpo_eq9   | eta log z + gamma z^n          | xDPO, Table 1 / Eq. 9 as printed               |
| xdpo_eq10  | eta log z - gamma (exp(n e_theta) - exp(n e_ref)) | xDPO, Eq. 10 as printed            |
| chi2       | log z + z                      | chi-PO's link (Huang et al. 2024), unclipped   |
| js         | log(2z / (1 + z))              | f-DPO (Wang et al., ICLR 2024)                 |
| alpha      | (1 - z^(-alpha)) / alpha       | f-DPO (Wang et al., ICLR 2024)                 |

The xDPO paper's Table 1 and Appendix C disagree on the sign of the exponent; `xdpo` follows the
Appendix C code (exp(6 (e_theta - e_ref)) / 6 + 0.05 (e_theta - e_ref), i.e. gamma z^-n with n = 6,
gamma = 1/6, eta = 0.05: the constants the paper reports). Exponent arguments are clamped to
[-clamp, clamp]; each function returns (reward, clamped) with `clamped` a bool mask. `chi2` is
`xdpo_eq9(1, 1, 1)`, chi-PO's link function; chi-PO also clips each reward beta * f'(z) to
[-2 R_max, 2 R_max] (its Algorithm 1), which `chi2` does not (only the exponent is clamped).
`xdpo_eq10` is the paper's third form, a difference of exponentials of the errors rather than an
exponential of their difference: with e_theta = e_ref - log z it is eta log z - gamma exp(n e_ref)
(z^(-n) - 1), so it alone also reads the reference's error level `e_ref` (every transform receives it);
its slope in -delta at delta = 0 is eta + gamma n exp(n e_ref), which depends on the error scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Transform = Callable[..., tuple[Tensor, Tensor]]


def _clamped_exp(arg: Tensor, clamp: float) -> tuple[Tensor, Tensor]:
    mask = arg.abs() > clamp
    return torch.exp(arg.clamp(-clamp, clamp)), mask


def _none(logz: Tensor) -> Tensor:
    return torch.zeros_like(logz, dtype=torch.bool)


def reverse_kl(logz: Tensor, **_: float) -> tuple[Tensor, Tensor]:
    """f'(z) = log z (Diffusion-DPO)."""
    return logz, _none(logz)


def xdpo(
    logz: Tensor, *, eta: float, gamma: float, n: float, clamp: float, **_: float
) -> tuple[Tensor, Tensor]:
    """f'(z) = eta log z - gamma z^(-n) = -eta*delta - gamma*exp(n*delta) for s = 1 (xDPO Appendix C)."""
    power, mask = _clamped_exp(-n * logz, clamp)
    return eta * logz - gamma * power, mask


def xdpo_eq9(
    logz: Tensor, *, eta: float, gamma: float, n: float, clamp: float, **_: float
) -> tuple[Tensor, Tensor]:
    """f'(z) = eta log z + gamma z^n (xDPO Table 1 / Eq. 9)."""
    power, mask = _clamped_exp(n * logz, clamp)
    return eta * logz + gamma * power, mask


def xdpo_eq10(
    logz: Tensor, *, eta: float, gamma: float, n: float, clamp: float, e_ref: Tensor, **_: float
) -> tuple[Tensor, Tensor]:
    """f'(z) = eta log z - gamma (exp(n e_theta) - exp(n e_ref)), e_theta = e_ref - log z (xDPO Eq. 10),
    computed as eta log z - gamma exp(n e_ref) expm1(-n log z) (no cancellation; each argument clamped)."""
    level, mask_ref = _clamped_exp(n * e_ref, clamp)
    arg = -n * logz
    mask = arg.abs() > clamp
    return eta * logz - gamma * level * torch.expm1(arg.clamp(-clamp, clamp)), mask | mask_ref


def chi2(logz: Tensor, *, clamp: float, **_: float) -> tuple[Tensor, Tensor]:
    """f'(z) = log z + z (chi-PO's link, Huang et al. 2024; without chi-PO's clipping of the reward)."""
    z, mask = _clamped_exp(logz, clamp)
    return logz + z, mask


def js(logz: Tensor, **_: float) -> tuple[Tensor, Tensor]:
    """f'(z) = log(2z / (1 + z)) = log 2 + log z - softplus(log z) (Jensen-Shannon, f-DPO)."""
    return torch.log(torch.tensor(2.0, dtype=logz.dtype, device=logz.device)) + logz - F.softplus(
        logz
    ), _none(logz)


def alpha_divergence(logz: Tensor, *, alpha: float, clamp: float, **_: float) -> tuple[Tensor, Tensor]:
    """f'(z) = (1 - z^(-alpha)) / alpha (alpha-divergence, f-DPO)."""
    power, mask = _clamped_exp(-alpha * logz, clamp)
    return (1.0 - power) / alpha, mask


DIVERGENCES: dict[str, Transform] = {
    "reverse_kl": reverse_kl,
    "xdpo": xdpo,
    "xdpo_eq9": xdpo_eq9,
    "xdpo_eq10": xdpo_eq10,
    "chi2": chi2,
    "js": js,
    "alpha": alpha_divergence,
}
