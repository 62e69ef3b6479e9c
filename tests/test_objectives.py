"""Every divergence and outer loss against its closed form; xDPO against the paper's Appendix C code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xdpo import preference_loss
from xdpo.objectives import DIVERGENCES, OUTER_LOSSES, UNIT_LABEL_EXACT, sft_loss


@pytest.fixture
def errs():
    g = torch.Generator().manual_seed(0)
    e = torch.rand(4, 16, generator=g, dtype=torch.float64) * 0.2 + 0.05
    return e[0], e[1], e[2], e[3]


def closed_form_reward(name: str, delta: torch.Tensor, p: dict, e_ref: torch.Tensor) -> torch.Tensor:
    """f'(z) with z = exp(-s * delta), written directly from docs/math.md §2 (no clamping)."""
    z = torch.exp(-p["s"] * delta)
    e_theta = e_ref + p["s"] * delta  # Eq. 10 reads the errors themselves (s folded into the policy's)
    return {
        "xdpo_eq10": p["eta"] * torch.log(z)
        - p["gamma"] * (torch.exp(p["n"] * e_theta) - torch.exp(p["n"] * e_ref)),
        "reverse_kl": torch.log(z),
        "xdpo": p["eta"] * torch.log(z) - p["gamma"] * z ** (-p["n"]),
        "xdpo_eq9": p["eta"] * torch.log(z) + p["gamma"] * z ** p["n"],
        "chi2": torch.log(z) + z,
        "js": torch.log(2 * z / (1 + z)),
        "alpha": (1 - z ** (-p["alpha"])) / p["alpha"],
    }[name]


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("outer", sorted(OUTER_LOSSES))
def test_every_combination_matches_closed_form(errs, divergence, outer):
    e_w, e_l, r_w, r_l = errs
    p = {"beta": 700.0, "eta": 0.3, "gamma": 0.25, "n": 3.0, "alpha": 0.4, "s": 1.7, "eps": 0.1}
    eps = p["eps"] if outer in ("sigmoid", "robust") else 0.0
    lam = torch.linspace(1.0, 2.0, 16, dtype=torch.float64)
    out = preference_loss(
        e_w,
        e_l,
        r_w,
        r_l,
        divergence=divergence,
        outer=outer,
        beta=p["beta"],
        eta=p["eta"],
        gamma=p["gamma"],
        n=p["n"],
        alpha=p["alpha"],
        label_smoothing=eps,
        logratio_scale=p["s"],
        weight=lam,
    )
    rw = closed_form_reward(divergence, e_w - r_w, p, r_w)
    rl = closed_form_reward(divergence, e_l - r_l, p, r_l)
    h = lam * (rw - rl)
    x = p["beta"] / 2 * h
    expected = {
        "sigmoid": -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x),
        "hinge": torch.relu(1 - x),
        "ipo": (h - 1 / p["beta"]) ** 2,
        "robust": (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps),
    }[outer]
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.reward_w.double() - out.reward_l.double(), x, rtol=1e-5, atol=1e-5)
    assert out.implicit_acc == pytest.approx(((x > 0).double() + 0.5 * (x == 0).double()).mean().item())
    assert out.loss.dtype == torch.float64  # never below float32; float64 inputs stay float64


def test_half_precision_errors_give_float32_loss(errs):
    half = [e.half() for e in errs]
    out = preference_loss(*half, divergence="xdpo", beta=1000.0)
    assert out.loss.dtype == torch.float32
    ref = preference_loss(*[e.float() for e in half], divergence="xdpo", beta=1000.0)
    torch.testing.assert_close(out.loss, ref.loss)


def test_reverse_kl_sigmoid_is_diffusion_dpo(errs):
    e_w, e_l, r_w, r_l = errs
    out = preference_loss(e_w, e_l, r_w, r_l, beta=5000.0)
    expected = -F.logsigmoid(-0.5 * 5000.0 * ((e_w - e_l) - (r_w - r_l)))
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


def appendix_c(model_w_err, model_l_err, ref_w_err, ref_l_err, beta):
    """xDPO Appendix C, transcribed (per-sample mean errors instead of .norm().pow(2))."""
    exp_w = torch.exp(6 * (model_w_err - ref_w_err)) / 6 + 0.05 * (model_w_err - ref_w_err)
    exp_l = torch.exp(6 * (model_l_err - ref_l_err)) / 6 + 0.05 * (model_l_err - ref_l_err)
    inside_term = -0.5 * beta * (exp_w - exp_l)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    return -1 * F.logsigmoid(inside_term), implicit_acc


def test_xdpo_equals_appendix_c_pseudocode(errs):
    e_w, e_l, r_w, r_l = errs
    out = preference_loss(e_w, e_l, r_w, r_l, divergence="xdpo", beta=1000.0, eta=0.05, gamma=1 / 6, n=6)
    loss, acc = appendix_c(e_w, e_l, r_w, r_l, 1000.0)
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=1e-6)
    assert out.implicit_acc == pytest.approx(acc.item())


def test_xdpo_eq9_with_unit_parameters_is_chi2(errs):
    e_w, e_l, r_w, r_l = errs
    a = preference_loss(e_w, e_l, r_w, r_l, divergence="xdpo_eq9", eta=1.0, gamma=1.0, n=1.0, beta=300.0)
    b = preference_loss(e_w, e_l, r_w, r_l, divergence="chi2", beta=300.0)
    torch.testing.assert_close(a.loss, b.loss)


def test_xdpo_near_zero_is_dpo_with_scaled_beta():
    """Slope of the Appendix C transform at delta = 0 is eta + gamma*n = 1.05 (docs/math.md §2)."""
    d = torch.tensor([1e-6, -2e-6], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    a = preference_loss(d, zero, zero, zero, divergence="xdpo", beta=1000.0)
    b = preference_loss(d, zero, zero, zero, divergence="reverse_kl", beta=1050.0)
    torch.testing.assert_close(a.reward_margin, b.reward_margin, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_gradients_are_finite_even_for_large_deltas(divergence):
    e_w = torch.tensor([0.1, 30.0, 0.2, 1e-3], requires_grad=True)
    e_l = torch.tensor([0.3, 0.1, 25.0, 1e-3], requires_grad=True)
    ref = torch.full((4,), 0.2)
    out = preference_loss(e_w, e_l, ref, ref, divergence=divergence, beta=1000.0)
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all()
    assert torch.isfinite(e_w.grad).all() and torch.isfinite(e_l.grad).all()


def test_clamping_engages_and_is_counted():
    # n*delta = 6*30 = 180 > clamp 50 for one of four pairs (w side only): 1 of 8 exponents clamped
    e_w = torch.tensor([30.2, 0.3, 0.1, 0.2])
    ref = torch.full((4,), 0.2)
    out = preference_loss(e_w, ref, ref, ref, divergence="xdpo", beta=1000.0, clamp=50.0)
    assert out.clamp_fraction == pytest.approx(1 / 8)
    assert torch.isfinite(out.loss).all()
    # the clamped value is exp(50), not exp(180)
    assert out.reward_w[0].item() == pytest.approx(500 * (0.05 * -30.0 - math.exp(50) / 6), rel=1e-5)
    none = preference_loss(ref, ref, ref, ref, divergence="xdpo")
    assert none.clamp_fraction == 0.0


def test_ties_count_half_in_implicit_accuracy():
    e = torch.full((2,), 0.1)
    out = preference_loss(e, e, e, e)
    assert out.implicit_acc == 0.5


def test_sft_is_plain_denoising_loss_on_winner(errs):
    e_w, e_l, r_w, r_l = errs
    out = sft_loss(e_w, e_l, r_w, r_l, beta=100.0)
    torch.testing.assert_close(out.loss.double(), e_w)
    torch.testing.assert_close(out.reward_margin.double(), -50.0 * ((e_w - r_w) - (e_l - r_l)))


def test_unknown_names_are_rejected(errs):
    with pytest.raises(ValueError, match="divergence"):
        preference_loss(*errs, divergence="kl")
    with pytest.raises(ValueError, match="outer"):
        preference_loss(*errs, outer="logistic")


def kto_closed_form(e_w, e_l, r_w, r_l, beta, z0=None, lam=1.0):
    g_w, g_l = r_w - e_w, r_l - e_l
    z0 = torch.cat([g_w, g_l]).mean() if z0 is None else z0
    z0 = max(float(z0), 0.0)
    return 0.5 * (
        (1 - torch.sigmoid(beta * lam * (g_w - z0))) + (1 - torch.sigmoid(-beta * lam * (g_l - z0)))
    )


def test_kto_matches_closed_form(errs):
    from xdpo.objectives import kto_loss

    e_w, e_l, r_w, r_l = errs
    out = kto_loss(e_w, e_l, r_w, r_l, beta=50.0)
    torch.testing.assert_close(out.loss.double(), kto_closed_form(e_w, e_l, r_w, r_l, 50.0))
    lam = torch.linspace(1, 2, 16, dtype=torch.float64)
    out = kto_loss(e_w, e_l, r_w, r_l, beta=50.0, weight=lam, reference_point=torch.tensor(0.01))
    torch.testing.assert_close(out.loss.double(), kto_closed_form(e_w, e_l, r_w, r_l, 50.0, 0.01, lam))


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    from xdpo.objectives import kto_loss

    # every image is worse than the reference (g < 0): the mean is negative, z0 is clamped to 0
    e = torch.tensor([0.5, 0.6], requires_grad=True)
    ref = torch.tensor([0.4, 0.4])
    out = kto_loss(e, e, ref, ref, beta=10.0)
    g = (ref - e).detach()
    expected = 0.5 * ((1 - torch.sigmoid(10 * g)) + (1 - torch.sigmoid(-10 * g)))
    torch.testing.assert_close(out.loss, expected)
    # an explicit negative reference point is clamped too
    same = kto_loss(e, e, ref, ref, beta=10.0, reference_point=torch.tensor(-3.0))
    torch.testing.assert_close(same.loss, expected)
    # gradients do not flow through the reference point: d loss / d e_w only through g_w
    rp = torch.tensor(0.05, requires_grad=True)
    kto_loss(e, e, ref, ref, beta=10.0, reference_point=rp).loss.sum().backward()
    assert rp.grad is None


# --- soft labels (ties kept with data.ties=keep) ------------------------------------------------


def closed_form_outer(outer: str, x: torch.Tensor, h: torch.Tensor, beta: float, eps: float):
    return {
        "sigmoid": -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x),
        "hinge": torch.relu(1 - x),
        "ipo": (h - 1 / beta) ** 2,
        "robust": (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps),
    }[outer]


@pytest.mark.parametrize("outer", sorted(OUTER_LOSSES))
def test_soft_label_is_the_expected_loss_over_both_orderings(errs, outer):
    e_w, e_l, r_w, r_l = errs
    beta, eps = 300.0, (0.1 if outer in ("sigmoid", "robust") else 0.0)
    label = torch.tensor([1.0, 0.5, 0.0, 0.25] * 4, dtype=torch.float64)
    out = preference_loss(e_w, e_l, r_w, r_l, outer=outer, beta=beta, label_smoothing=eps, label=label)
    h = -((e_w - r_w) - (e_l - r_l))  # reverse_kl: r = -delta
    x = beta / 2 * h
    fwd, rev = closed_form_outer(outer, x, h, beta, eps), closed_form_outer(outer, -x, -h, beta, eps)
    torch.testing.assert_close(out.loss, label * fwd + (1 - label) * rev)
    # label 1 (and None) is the ordinary loss; label 0 is the swapped pair; a tie is their mean
    plain = preference_loss(e_w, e_l, r_w, r_l, outer=outer, beta=beta, label_smoothing=eps)
    swapped = preference_loss(e_l, e_w, r_l, r_w, outer=outer, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(out.loss[0::4], plain.loss[0::4])
    torch.testing.assert_close(out.loss[2::4], swapped.loss[2::4])
    torch.testing.assert_close(out.loss[1::4], 0.5 * (plain.loss[1::4] + swapped.loss[1::4]))


def test_tie_gradient_pulls_logits_to_zero():
    """A tie kept as a win pushes the margin up forever; as a soft target 0.5 its optimum is x = 0."""
    for margin, sign in ((0.3, 1.0), (-0.3, -1.0)):
        e_w = torch.tensor([0.1 - margin / 2], dtype=torch.float64, requires_grad=True)
        e_l = torch.tensor([0.1 + margin / 2], dtype=torch.float64)
        ref = torch.full((1,), 0.1, dtype=torch.float64)
        out = preference_loss(e_w, e_l, ref, ref, beta=10.0, label=torch.tensor([0.5]))
        out.loss.sum().backward()
        # x = 5 * margin > 0 (w favoured): the gradient descent step raises e_w, lowering x toward 0
        assert sign * e_w.grad.item() < 0
    zero = torch.full((1,), 0.1, dtype=torch.float64, requires_grad=True)
    out = preference_loss(
        zero, zero.detach(), zero.detach(), zero.detach(), beta=10.0, label=torch.tensor([0.5])
    )
    out.loss.sum().backward()
    assert zero.grad.abs().item() < 1e-12


def test_the_pair_record_passes_label_and_per_image_objectives_ignore_it(errs):
    from xdpo.config import LossConfig
    from xdpo.objectives import LossInput, get_objective, kto_loss

    e_w, e_l, r_w, r_l = errs
    tie = torch.full((16,), 0.5, dtype=torch.float64)
    pair = get_objective("pair")
    params = {k: getattr(LossConfig(), k) for k in pair.params} | {"beta": 300.0}
    inp = LossInput(err=torch.cat([e_w, e_l]), ref=torch.cat([r_w, r_l]), pairs=True, label=tie)
    a = pair.loss(inp, **params)
    b = preference_loss(e_w, e_l, r_w, r_l, beta=300.0, label=tie)
    torch.testing.assert_close(a.loss, b.loss)
    ones = LossInput(err=inp.err, ref=inp.ref, pairs=True, label=torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close(
        pair.loss(ones, **params).loss, preference_loss(e_w, e_l, r_w, r_l, beta=300.0).loss
    )
    torch.testing.assert_close(
        sft_loss(e_w, e_l, r_w, r_l, label=tie).loss, sft_loss(e_w, e_l, r_w, r_l).loss
    )
    torch.testing.assert_close(
        kto_loss(e_w, e_l, r_w, r_l, label=tie).loss, kto_loss(e_w, e_l, r_w, r_l).loss
    )


# --- IPO on the beta / 2 scale of the other outer losses -----------------------------------------


def trl_sigmoid(h: torch.Tensor, tau: float) -> torch.Tensor:
    """DPO as TRL writes it: -log sigma(tau * h), h the log-ratio difference."""
    return -F.logsigmoid(tau * h)


def trl_ipo(h: torch.Tensor, tau: float) -> torch.Tensor:
    """IPO as Azar et al. / TRL write it: (h - 1 / (2 tau))^2."""
    return (h - 1 / (2 * tau)) ** 2


def test_ipo_and_sigmoid_share_one_beta_scale():
    """At loss.beta = b both outer losses are their TRL forms at tau = b / 2 (the logits' scale)."""
    h = torch.linspace(-3e-3, 3e-3, 13, dtype=torch.float64)
    zero = torch.zeros_like(h)
    for beta in (1000.0, 5000.0):
        sig = preference_loss(-h, zero, zero, zero, outer="sigmoid", beta=beta)  # reverse_kl: h = -e_w
        ipo = preference_loss(-h, zero, zero, zero, outer="ipo", beta=beta)
        torch.testing.assert_close(sig.loss, trl_sigmoid(h, beta / 2))
        torch.testing.assert_close(ipo.loss, trl_ipo(h, beta / 2))


@pytest.mark.parametrize("beta", [1000.0, 5000.0])
def test_ipo_gradient_near_its_optimum(beta):
    """d loss / d h = 2 (h - 1/beta): zero at h* = 1/beta, i.e. at logits (beta/2) h* = 1/2 for every beta.

    With the old (h - 1/(2 beta))^2 the optimum sat at h* = 1/(2 beta), logits 1/4: at equal beta
    twice the regularisation of sigmoid/hinge, whose logits also carry beta/2.
    """
    h_star = 1 / beta
    h = torch.tensor([h_star, h_star + 1e-4, h_star - 1e-4], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(3, dtype=torch.float64)
    out = preference_loss(-h, zero, zero, zero, outer="ipo", beta=beta)  # reverse_kl: r_w - r_l = h
    (grad,) = torch.autograd.grad(out.loss.sum(), h)
    torch.testing.assert_close(grad, 2 * (h.detach() - h_star))
    assert grad[0].abs().item() < 1e-15
    assert out.reward_margin[0].item() == pytest.approx(0.5)  # the logits at the optimum


def test_gradient_magnitudes_at_sd15_scale_against_adamw_epsilon():
    """How large is d loss / d h at SD1.5 scale (beta 5000, mean errors, |h| ~ 1e-4..1e-3)?

    The parameter gradient is (d loss / d h) * (d h / d theta). d h / d theta is the difference of two
    gradients of a per-element mean squared error; for SD1.5 (8.6e8 parameters) a plain denoising
    gradient has a norm of order 0.1-1, i.e. ~1e-5 per parameter (RMS; an assumption, not measured
    here). Sigmoid multiplies it by (beta/2) sigma(-x) ~ 190..2300 (grad-norm clipping then bounds the
    step); IPO by 2 |h - 1/beta| ~ 1e-4..2.4e-3, giving
    per-parameter gradients ~1e-9..2e-8, the size of AdamW's epsilon (1e-8): Adam's normalised step
    g / (sqrt(v) + eps) then shrinks by a factor sqrt(v) / (sqrt(v) + eps), ~0.1-0.7, uncontrolled and
    per parameter. IPO at this beta needs adam_epsilon well below 1e-8 (e.g. 1e-12) or a smaller beta.
    """
    beta, dh_dtheta, adam_eps = 5000.0, 1e-5, 1e-8
    h = torch.tensor([1e-4, 3e-4, 1e-3, -1e-4, -1e-3], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros_like(h)
    g = {}
    for outer in ("sigmoid", "ipo"):
        out = preference_loss(-h, zero, zero, zero, outer=outer, beta=beta)
        g[outer] = torch.autograd.grad(out.loss.sum(), h)[0].abs()
    assert g["sigmoid"].min() > 150 and g["sigmoid"].max() <= beta / 2  # (beta/2) sigma(-x), |x| <= 2.5
    assert (g["sigmoid"] / g["ipo"]).min() > 1e5  # IPO's gradients are 5-6 orders of magnitude smaller
    assert g["ipo"].max() < 3e-3 and g["ipo"].min() > 1e-4
    param_grad = g["ipo"] * dh_dtheta
    assert param_grad.max() < 3 * adam_eps  # comparable to epsilon: the update is damped
    shrink = param_grad / (param_grad + adam_eps)  # Adam's step relative to the eps-free step
    assert shrink.min() > 0.05 and shrink.max() < 0.75


def test_kto_on_independent_images_matches_the_closed_form():
    from xdpo.objectives import kto_images_loss

    e = torch.tensor([0.10, 0.30, 0.20, 0.05], dtype=torch.float64)
    e_ref = torch.tensor([0.20, 0.25, 0.20, 0.10], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    out = kto_images_loss(e, e_ref, desirable, beta=10.0, reference_point=torch.tensor(0.01))
    g = e_ref - e
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    expected = 1 - torch.sigmoid(10.0 * sign * (g - 0.01))
    torch.testing.assert_close(out.loss, expected)
    # a negative mean reward is clamped to a reference point of 0
    low = kto_images_loss(e, e_ref, desirable, beta=10.0, reference_point=torch.tensor(-5.0))
    torch.testing.assert_close(low.loss, 1 - torch.sigmoid(10.0 * sign * g))
    assert out.implicit_acc == pytest.approx(((sign * (g - 0.01)) > 0).double().mean().item())


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("outer", sorted(UNIT_LABEL_EXACT))
def test_unit_labels_and_weights_are_the_fast_path_bit_for_bit(divergence, outer):
    """label=None and weight=None skip ops (step.py passes no label when every pair's is 1, for these
    outer losses): the loss, the logged values and the gradients equal those of all-ones labels and
    weights exactly, and a loss is non-finite where it was (a non-finite loss skips the step)."""
    g = torch.Generator().manual_seed(3)
    for dtype, eps in ((torch.float32, 0.0), (torch.float64, 0.1), (torch.float16, 0.0)):
        e = (torch.rand(16, generator=g) * 0.1).to(dtype)
        ref = (torch.rand(16, generator=g) * 0.1).to(dtype)
        runs = []
        for label, weight in ((torch.ones(8), torch.ones(8)), (None, None)):
            x = e.clone().requires_grad_()
            out = preference_loss(
                x[:8], x[8:], ref[:8], ref[8:], divergence=divergence, outer=outer,
                label_smoothing=eps, label=label, weight=weight,
            )  # fmt: skip
            out.loss.sum().backward()
            runs.append((out, x.grad))
        (a, grad_a), (b, grad_b) = runs
        for k in ("loss", "reward_w", "reward_l", "clamped", "delta_w", "delta_l"):
            assert torch.equal(getattr(a, k), getattr(b, k)) and getattr(a, k).dtype == getattr(b, k).dtype
        assert torch.equal(grad_a, grad_b)
    inf, nan = float("inf"), float("nan")
    for bad in ([0.1, inf, 0.1, 0.2], [0.1, 0.2, -inf, 0.1], [inf, 0.2, 0.1, inf], [nan, 0.1, 0.1, 0.1]):
        e = torch.tensor(bad)
        a, b = (
            preference_loss(e[:2], e[2:], e[2:], e[:2], divergence=divergence, outer=outer, label=label)
            for label in (torch.ones(2), None)
        )
        assert torch.equal(torch.isfinite(a.loss), torch.isfinite(b.loss))
