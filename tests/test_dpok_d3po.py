"""DPOK and D3PO: their losses and gradients on fixed tensors against transcriptions of the formulas, and one
short online run each on a tiny pipeline (the recorded steps train, the reference's log-probs are used)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import INK_REWARD
from test_train import read_metrics, run
from xdpo.objectives.d3po import d3po_loss
from xdpo.objectives.dpok import dpok_loss


def test_dpok_loss_and_gradient_equal_the_transcription():
    logp = torch.tensor([0.0, 2e-4, -3e-4, 5e-5], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(4, dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -2.0, -0.5], dtype=torch.float64)
    mean = torch.arange(4 * 3, dtype=torch.float64).reshape(4, 3) / 10
    mean.requires_grad_(True)
    ref = torch.zeros_like(mean)
    std = torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    loss, kl = dpok_loss(logp, old, adv, reward_weight=10.0, kl_weight=0.01, clip_range=1e-4, step_mean=mean,
                         ref_step_mean=ref, step_std=std)  # fmt: skip
    want = []
    for i in range(4):
        r = math.exp(float(logp[i]))
        rc = min(max(r, 1 - 1e-4), 1 + 1e-4)
        k = sum(float(m) ** 2 for m in mean[i]) / 3 / (2 * float(std[i]) ** 2)
        want.append(10 * -min(float(adv[i]) * r, float(adv[i]) * rc) + 0.01 * k)
    assert loss.tolist() == pytest.approx(want, rel=1e-6)
    g_logp, g_mean = torch.autograd.grad(loss.sum(), (logp, mean))
    r = torch.exp(logp).detach()
    # rows 0 and 3 inside the band: -alpha A r; row 1 (A > 0, r > 1 + eps) and row 2 (A < 0, r < 1 - eps) clipped
    torch.testing.assert_close(
        g_logp,
        torch.tensor([-10 * r[0], 0.0, 0.0, -10 * -0.5 * r[3]], dtype=torch.float64),
        rtol=1e-6,
        atol=1e-6,
    )
    torch.testing.assert_close(
        g_mean, 0.01 * mean.detach() / 3 / std[:, None] ** 2, rtol=1e-6, atol=1e-8
    )  # d KL / d mu


def test_d3po_loss_equals_the_transcription_on_best_and_worst_of_each_group():
    # two groups of three images; group 1's scores tie (no gradient, log 2)
    logp = torch.tensor([0.05, -0.02, 0.3, 0.01, 0.02, 0.03], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    score = torch.tensor([1.0, -1.0, 0.2, 0.5, 0.5, 0.5], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, rw, rl = d3po_loss(logp, ref, score, group, beta=0.1, eps=0.1)

    def clipped(x):
        return math.log(min(max(math.exp(x), 0.9), 1.1))

    g0 = -math.log(
        1 / (1 + math.exp(-(0.1 * clipped(0.05) - 0.1 * clipped(-0.02))))
    )  # best row 0, worst row 1
    assert loss.tolist() == pytest.approx([g0] * 3 + [math.log(2)] * 3, rel=1e-6)
    assert rw.tolist() == pytest.approx([0.1 * 0.05, 0.0]) and rl.tolist() == pytest.approx(
        [0.1 * -0.02, 0.0]
    )
    (g,) = torch.autograd.grad(loss.mean(), logp)  # only the best and worst of group 0 get gradient
    s = 1 / (1 + math.exp(-(0.1 * 0.05 + 0.1 * 0.02)))
    torch.testing.assert_close(g, torch.tensor([-(1 - s) * 0.1 * 3 / 6, (1 - s) * 0.1 * 3 / 6, 0, 0, 0, 0],
                                               dtype=torch.float64), rtol=1e-5, atol=1e-8)  # fmt: skip


@pytest.mark.parametrize("objective", ["dpok", "d3po"])
def test_a_short_online_run_trains_on_the_recorded_steps(tmp_path, monkeypatch, tiny_pipeline_dir, objective):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text(INK_REWARD)
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    kw = {"loss.objective": objective, "online.enabled": True, "online.every": 2, "online.per_prompt": 2,
          "online.scorer": "rewards:ink", "online.sample_steps": 3, "online.monitor_images": 0,
          "online.prompts": tmp_path / "prompts.txt", "train.batch_size": 2, "train.max_steps": 2,
          "train.learning_rate": 1e-3, "data.path": "", "data.resolution": 32}  # fmt: skip
    out = run(tmp_path, tiny_pipeline_dir, "", **kw)
    rows = read_metrics(out)
    assert rows[0]["ratio_at_start"] < 1e-5 and all(math.isfinite(r["loss"]) for r in rows)
    t = load_file(str(out / "online" / "round-0000" / "rollouts.safetensors"))
    x, nxt = t["sde_x"][:, 0], t["sde_next"][:, 0]  # the first step: from the initial noise
    if objective == "d3po":  # at the first update the policy is the reference: every log-ratio is 0
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        # a pair starts from one initial noise and parts by the sampler's noise (the authors' code)
        assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[3]) and not torch.equal(nxt[0], nxt[1])
    else:
        assert not torch.equal(x[0], x[1])
        assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-10) and rows[1]["kl"] > 0
