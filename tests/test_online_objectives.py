"""The decoupled online objectives (DiffusionNFT, AWM, DGPO) on fixed tensors against independent, plain-Python
transcriptions of their papers' / codes' formulas and the research notes' worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xdpo.objectives import LossInput, get_objective
from xdpo.objectives.awm import awm_loss, strata
from xdpo.objectives.dgpo import dgpo_loss, early_steps
from xdpo.objectives.nft import grid_share, nft_loss, optimality
from xdpo.rollout.advantages import group_advantages, score_and_advantage


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def population_advantages(rewards: list[float]) -> list[float]:
    m = sum(rewards) / len(rewards)
    sd = math.sqrt(sum((x - m) ** 2 for x in rewards) / len(rewards))
    return [(x - m) / (sd + 1e-4) for x in rewards]


# ---- DiffusionNFT (notes §5): one group, K = 4, D = 4 latent elements, t = 0.6, beta = 1 -------------------
NFT_R = [0.2, 0.5, 0.6, 0.9]
X0, EPS = [0.5, -1, 0.2, 0], [1, 0.5, -0.3, 0.8]
V_OLD, V_THETA, V_REF = [0.4, 1.2, -0.2, 0.9], [0.45, 1.3, -0.4, 0.7], [0.4, 1.0, -0.3, 1.0]


def nft_transcribed(r: float, t: float, beta: float, adaptive: bool, code: bool, kl: float) -> float:
    """Eq. 5 with the implicit policies (Thm 3.2), the code's adaptive x0 weight, 5/beta scale and KL term."""
    xt = [(1 - t) * a + t * b for a, b in zip(X0, EPS, strict=True)]
    v = [b - a for a, b in zip(X0, EPS, strict=True)]
    vp = [(1 - beta) * o + beta * n for o, n in zip(V_OLD, V_THETA, strict=True)]
    vn = [(1 + beta) * o - beta * n for o, n in zip(V_OLD, V_THETA, strict=True)]

    def mse(a, b):
        return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a)

    def mae(a, b):
        return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)

    if adaptive:
        x0p = [a - t * b for a, b in zip(xt, vp, strict=True)]
        x0n = [a - t * b for a, b in zip(xt, vn, strict=True)]
        pos, neg = mse(x0p, X0) / max(mae(x0p, X0), 1e-5), mse(x0n, X0) / max(mae(x0n, X0), 1e-5)
    else:
        pos, neg = mse(vp, v), mse(vn, v)
    loss = r * pos + (1 - r) * neg
    return (5 / beta if code else 1.0) * loss + kl * mse(V_THETA, V_REF)


def nft_tensors(r_index: int = 3):
    adv = population_advantages(NFT_R)[r_index]
    v = t64([b - a for a, b in zip(X0, EPS, strict=True)]).view(1, 4, 1, 1)
    return (
        t64(V_THETA).view(1, 4, 1, 1).requires_grad_(True), t64(V_OLD).view(1, 4, 1, 1), v, t64([adv]),
        t64(V_REF).view(1, 4, 1, 1),
    )  # fmt: skip


def test_nft_optimality_probabilities_match_the_notes():
    a = t64(population_advantages(NFT_R))
    torch.testing.assert_close(a, t64([-1.39944, -0.19992, 0.19992, 1.39944]), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        optimality(a, 5.0), t64([0.360056, 0.480008, 0.519992, 0.639944]), atol=1e-6, rtol=0
    )
    plain = optimality(t64([(x - 0.55) / 0.25 for x in NFT_R]), 1.0)  # the paper's Z = std
    torch.testing.assert_close(plain, t64([0.0, 0.4, 0.6, 1.0]), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("adaptive", "code", "kl", "expected"),
    [(True, True, 1e-4, 0.68471315), (False, False, 0.0, 0.05703144), (True, False, 0.0, None)],
)
def test_nft_loss_equals_the_transcription(adaptive, code, kl, expected):
    pred, old, v, adv, ref = nft_tensors()
    r = optimality(adv, 5.0).item()
    loss, _ = nft_loss(pred, old, v, adv, x0_scale=t64([0.6]), beta=1.0, adaptive=adaptive, code_scale=code,
                       kl_weight=kl, init_pred=ref)  # fmt: skip
    want = nft_transcribed(r, 0.6, 1.0, adaptive, code, kl)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    if expected is not None:
        assert loss.item() == pytest.approx(expected, rel=1e-6)  # the notes' worked example


def test_nft_minimiser_is_the_closed_form_per_sample_optimum():
    """Plain Eq. 5 at fixed (x_t, v): v_theta* = v_old + (2r - 1)(v - v_old) / beta (notes §1)."""
    _, old, v, adv, _ = nft_tensors()
    pred = old.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([pred], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        opt.zero_grad()
        loss, _ = nft_loss(
            pred, old, v, adv, x0_scale=t64([0.6]), adaptive=False, code_scale=False, kl_weight=0
        )
        loss.sum().backward()
        return loss.sum()

    opt.step(closure)
    torch.testing.assert_close(
        pred.detach().view(-1), t64([0.427989, 1.283966, -0.283966, 0.872011]), atol=1e-5, rtol=0
    )


def test_nft_grid_share_is_a_permutation_prefix():
    got = grid_share(10, {"train_fraction": 0.99}, np.random.default_rng(0))
    assert len(got) == 9 and len(set(got)) == 9 and set(got) <= set(range(10))


# ---- AWM (notes §6): rewards [0.9, 0.6, 0.3, 0.2], e = [0.30, 0.25, 0.40, 0.35] at t = 0.7 ---------------------
AWM_R, AWM_E = [0.9, 0.6, 0.3, 0.2], [0.30, 0.25, 0.40, 0.35]


@pytest.mark.parametrize(
    ("weighting", "grad"),
    [
        ("uniform", [0.073003, 0.018251, -0.036502, -0.054752]),
        ("ghuber", [0.126066, 0.036135, -0.0508, -0.084227]),
    ],
)
def test_awm_gradient_is_the_advantage_weighted_matching_gradient(weighting, grad):
    adv = t64(population_advantages(AWM_R))
    e = t64(AWM_E).requires_grad_(True)
    awm_loss(e, adv, t=t64([0.7] * 4), weighting=weighting, kl_weight=0, ema_weight=0).mean().backward()
    a = [max(-5, min(5, x)) / 5 for x in population_advantages(AWM_R)]
    if weighting == "uniform":
        want = [ai / 4 for ai in a]
    else:
        want = [ai / 4 * 0.7 * (x + 1e-10) ** (0.25 - 1) for ai, x in zip(a, AWM_E, strict=True)]
    torch.testing.assert_close(e.grad, t64(want), atol=1e-9, rtol=0)
    torch.testing.assert_close(e.grad, t64(grad), atol=1e-5, rtol=0)  # the notes' worked numbers


def test_awm_regularisers():
    pred = t64([0.45, 1.3]).view(1, 2, 1, 1)
    loss = awm_loss(t64([0.0]), t64([0.0]), t=t64([0.7]), kl_weight=0.001, ema_weight=1.0, pred=pred,
                    init_pred=t64([0.4, 1.0]).view(1, 2, 1, 1), ref_pred=t64([0.44, 1.25]).view(1, 2, 1, 1))  # fmt: skip
    assert loss.item() == pytest.approx(4.625e-05 + 0.0013, rel=1e-9)


def test_awm_strata_are_the_codes_discrete_without_init():
    """14 steps, K = 6, fraction 0.9: strata [1,2) [2,4) [4,6) [6,8) [8,10) [10,12) (notes §4)."""
    got = strata(14, {"train_timesteps": 6, "timestep_fraction": 0.9}, np.random.default_rng(1))
    edges = [1, 2, 4, 6, 8, 10, 12]
    assert all(lo <= g < hi for g, lo, hi in zip(got, edges[:-1], edges[1:], strict=True))


# ---- DGPO (notes §5): one group, rewards [0.9, 0.6, 0.3, 0.2], beta = 100 ---------------------------------------
E_THETA, E_REF, E_OLD = [0.30, 0.25, 0.40, 0.35], [0.32, 0.26, 0.38, 0.33], [0.31, 0.25, 0.39, 0.36]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("form", ["paper", "code"])
def test_dgpo_loss_and_gradient_equal_the_transcription(form):
    a = population_advantages(AWM_R)
    d = [x - y for x, y in zip(E_THETA, E_REF, strict=True)]
    beta_eff = 100.0 / 4 if form == "code" else 100.0
    s = beta_eff * sum(ai * di for ai, di in zip(a, d, strict=True))
    want_loss = -math.log(sig(-s))
    # code: the surrogate's mean over the 4 images; paper: each image carries the group's loss (mean = L_g)
    want_grad = [sig(s) * (1 / 4 if form == "code" else beta_eff) * ai for ai in a]
    e = t64(E_THETA).requires_grad_(True)
    loss = dgpo_loss(e, t64(E_REF), t64(a), torch.zeros(4, dtype=torch.long), beta=100.0, form=form, clip=0.0)
    torch.testing.assert_close(loss.detach(), t64([want_loss] * 4), atol=1e-12, rtol=1e-9)
    loss.mean().backward()
    torch.testing.assert_close(e.grad, t64(want_grad), atol=1e-12, rtol=1e-9)
    if form == "paper":
        assert s == pytest.approx(-6.93528665, rel=1e-8) and want_loss == pytest.approx(0.00097237, rel=1e-4)
        torch.testing.assert_close(e.grad, t64([0.141903, 0.035476, -0.070952, -0.106427]), atol=1e-6, rtol=0)
    else:
        assert sig(s) == pytest.approx(0.1500994, rel=1e-6)
        torch.testing.assert_close(e.grad, t64([0.054789, 0.013697, -0.027394, -0.041091]), atol=1e-6, rtol=0)


def test_dgpo_is_shift_invariant_and_clips_like_the_code():
    a, g = t64(population_advantages(AWM_R)), torch.zeros(4, dtype=torch.long)
    base = dgpo_loss(t64(E_THETA), t64(E_REF), a, g, form="paper", clip=0.0)
    shifted = dgpo_loss(t64(E_THETA), t64(E_REF) + 0.1, a, g, form="paper", clip=0.0)
    torch.testing.assert_close(base, shifted)
    e = t64(E_THETA).requires_grad_(True)
    dgpo_loss(e, t64(E_REF), a, g, clip=0.01, old=t64(E_OLD)).mean().backward()
    assert e.grad[0] == 0 and (e.grad[1:] != 0).all()  # only sample 1 (A > 0, ratio 1.01005 > 1.01) frozen


def test_dgpo_groups_are_separate():
    """Two groups in one micro-batch: each image's loss is its own group's."""
    a = t64(population_advantages(AWM_R) * 2)
    two = dgpo_loss(t64(E_THETA * 2), t64(E_REF + [x + 0.05 for x in E_REF]), a,
                    torch.tensor([0] * 4 + [1] * 4), form="paper", clip=0.0)  # fmt: skip
    one = dgpo_loss(t64(E_THETA), t64(E_REF), a[:4], torch.zeros(4, dtype=torch.long), form="paper", clip=0.0)
    torch.testing.assert_close(two[:4], one)
    torch.testing.assert_close(two[4:], one)  # group 2: e_ref shifted by 0.05, the same loss


def test_dgpo_early_steps_are_distinct_and_clipped():
    got = early_steps(10, {"train_timesteps": 4, "max_index": 6}, np.random.default_rng(0))
    assert len(set(got)) == 4 and max(got) <= 6


# ---- advantages and per-reward normalisation against closed forms -------------------------------------------


def test_group_advantages_closed_form():
    r = np.array([0.2, 0.5, 0.6, 0.9, 1.0, 1.0, 3.0, 5.0])
    g = np.repeat([0, 1], 4)
    glob = group_advantages(r, g, "global")
    sd = r.std()
    want = np.concatenate([(r[:4] - 0.55) / (sd + 1e-4), (r[4:] - 2.5) / (sd + 1e-4)])
    np.testing.assert_allclose(glob, want, rtol=1e-12)
    grp = group_advantages(r, g, "group")
    np.testing.assert_allclose(grp[:4], population_advantages(list(r[:4])), rtol=1e-12)
    same = group_advantages(np.ones(4), np.zeros(4, dtype=int), "group")
    assert (same == 0).all()


def test_gdpo_normalises_each_reward_in_its_group_then_the_batch():
    raw = np.array([[1.0, 100.0], [2.0, 300.0], [3.0, 200.0], [0.0, 0.0], [1.0, 10.0], [5.0, 20.0]])
    g = np.repeat([0, 1], 3)
    w = np.array([1.0, 0.5])
    s, a = score_and_advantage(raw, w, g, norm="gdpo")
    want = np.zeros(6)
    for j, wj in enumerate(w):
        for grp in (0, 1):
            col = raw[g == grp, j]
            want[g == grp] += wj * (col - col.mean()) / (col.std() + 1e-4)
    np.testing.assert_allclose(s, want, rtol=1e-12)
    np.testing.assert_allclose(a, (want - want.mean()) / (want.std() + 1e-4), rtol=1e-12)
    s2, _ = score_and_advantage(raw, w, g, norm="sum")
    np.testing.assert_allclose(s2, raw @ w, rtol=1e-12)  # the plain weighted sum: the second reward dominates


def test_records_declare_rollouts_and_their_forwards():
    nft, awm, dgpo = get_objective("nft"), get_objective("awm"), get_objective("dgpo")
    assert {nft.data, awm.data, dgpo.data} == {("rollouts",)}
    assert nft.samples_with == "reference" and awm.samples_with == dgpo.samples_with == "policy"
    assert dgpo.noise == "group" and nft.noise == awm.noise == "image"
    assert nft.initial({"kl_weight": 1e-4}) and not nft.initial({"kl_weight": 0.0})
    assert dgpo.initial({"kl_weight": 0.0, "reference": "initial"})
    inp = LossInput(err=t64(E_THETA), ref=t64(E_REF), pairs=False, advantage=t64([1.0, -1.0, 0.5, 0.0]))
    from xdpo.objectives.output import rollout_output

    out = rollout_output(inp.err, inp)
    assert out.implicit_acc == pytest.approx((1 + 0 + 0 + 0.5) / 4)  # moved the advantage's way; A = 0 ties
