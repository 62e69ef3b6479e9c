"""GRPO (Flow-GRPO's PPO-clip with MixGRPO's window): the loss against a transcription of the formula, the
window schedule, and ratio = 1 at the first update of a round on tiny pipelines (the log-probs recomputed at
training time equal the recorded ones on the same weights)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import INK_REWARD
from test_train import read_metrics, run
from xdpo.objectives.grpo import grpo_loss
from xdpo.objectives.likelihood import window_steps


def transcription(logp, old, adv, eps, c, beta, kl):
    """Per row, with scalars: -min(A r, A clip(r)) with A clipped to [-c, c], + beta KL."""
    out = []
    for lp, o, a, k in zip(logp, old, adv, kl, strict=True):
        a = max(-c, min(c, a))
        r = math.exp(lp - o)
        rc = max(1 - eps, min(1 + eps, r))
        out.append(-min(a * r, a * rc) + beta * k)
    return out


def test_grpo_loss_equals_the_transcription_and_its_gradient_is_ppos():
    logp = torch.tensor([0.0, 0.3, -0.2, 0.01, -0.05, 0.2], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.25], dtype=torch.float64)
    adv = torch.tensor([1.0, 2.0, -1.5, -0.7, 9.0, -8.0], dtype=torch.float64)
    mean = torch.randn(6, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = torch.zeros_like(mean)
    std = torch.tensor([0.5, 1.0, 2.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    kl = (mean**2).mean(dim=(1, 2, 3)) / (2 * std**2)
    for eps, beta in ((0.2, 0.0), (0.02, 0.04)):
        loss, got_kl = grpo_loss(logp, old, adv, clip_range=eps, adv_clip=5.0, kl_weight=beta, step_mean=mean,
                                 ref_step_mean=ref, step_std=std)  # fmt: skip
        want = transcription(logp.tolist(), old.tolist(), adv.tolist(), eps, 5.0, beta, kl.tolist())
        assert loss.tolist() == pytest.approx(want, rel=1e-6)
        assert (got_kl is None) == (beta == 0)
    (g,) = torch.autograd.grad(grpo_loss(logp, old, adv, clip_range=0.2, kl_weight=0.0)[0].sum(), logp)
    r, a = torch.exp(logp - old).detach(), adv.clamp(-5, 5)
    inside = ((r > 0.8) & (r < 1.2)) | ((a > 0) & (r <= 0.8)) | ((a < 0) & (r >= 1.2))  # PPO's unclipped side
    torch.testing.assert_close(g, torch.where(inside, -a * r, torch.zeros_like(r)))


def test_window_schedule_is_mixgrpos_sliding_window_and_flow_grpo_fast_at_the_start():
    full = {"window": 0, "train_fraction": 0.99}
    assert window_steps(10, full, 3) == (tuple(range(10)), tuple(range(9)))  # Flow-GRPO: 9 of 10 trained
    mix = {"window": 3, "window_every": 2, "window_stride": 2}
    assert [window_steps(8, mix, r)[0] for r in (0, 1, 2, 3, 4, 9)] == [
        (0, 1, 2), (0, 1, 2), (2, 3, 4), (2, 3, 4), (4, 5, 6), (5, 6, 7)  # clamped at the end
    ]  # fmt: skip
    fast = {"window": 2, "window_every": 0, "window_stride": 1}
    assert {window_steps(10, fast, r) for r in range(5)} == {((0, 1), (0, 1))}


RUN = {
    "loss.objective": "grpo",
    "online.enabled": True,
    "online.every": 2,
    "online.per_prompt": 2,
    "online.scorer": "rewards:ink",
    "online.sample_steps": 4,
    "online.monitor_images": 0,
    "train.batch_size": 2,
    "train.max_steps": 2,
    "train.learning_rate": 1e-2,
    "data.path": "",
}
CASES = {  # DDPM with CFG (DDIM eta 1) and full fine-tune; flow without CFG (the SDE), LoRA, a window
    "tiny_pipeline_dir": {"data.resolution": 32, "online.guidance": 3.0},
    "tiny_sd3_pipeline_dir": {
        "data.resolution": 16,
        "family.max_sequence_length": 32,
        "model.lora_rank": 4,
        "grpo.window": 2,
        "grpo.window_every": 0,
    },  # fmt: skip
}


@pytest.mark.parametrize("fixture", list(CASES))
def test_ratio_is_one_at_the_first_update_and_moves_after_it(request, tmp_path, monkeypatch, fixture):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text(INK_REWARD)
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    kw = {**RUN, "online.prompts": tmp_path / "prompts.txt", **CASES[fixture]}
    out = run(tmp_path, request.getfixturevalue(fixture), "", **kw)
    rows = read_metrics(out)
    assert rows[0]["ratio_at_start"] < 1e-5  # the recorded log-probs, recomputed on the same weights
    assert "ratio_at_start" not in rows[1] and rows[1]["ratio_dev"] > 1e-6  # after an update: off-policy
    from safetensors.torch import load_file

    t = load_file(str(out / "online" / "round-0000" / "rollouts.safetensors"))
    steps = 2 if "grpo.window" in kw else int(4 * 0.99)
    assert t["sde_x"].shape[:2] == (4, steps) and t["sde_logp"].shape == (4, steps)


@pytest.mark.parametrize("strategy", ["stable", "ema"])
def test_grpo_composes_with_the_reference_strategies(request, tmp_path, monkeypatch, strategy):
    """Kang et al.'s stable update (its guard's Eq. 8 `kang` estimate on round 0's preferred clean samples)
    and an EMA reference: the KL term's reference moves."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text(INK_REWARD)
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # delta in kang units (T x the error gap): D is ~160 after one step of this tiny model
    kw = {**RUN, "online.prompts": tmp_path / "prompts.txt", "data.resolution": 32, "train.max_steps": 3,
          "reference.strategy": strategy, "reference.update_every": 1, "reference.divergence": "kang",
          "reference.max_divergence": 1e6}  # fmt: skip
    rows = read_metrics(run(tmp_path, request.getfixturevalue("tiny_pipeline_dir"), "", **kw))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["ref_updates"] >= 1
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in rows)
    if strategy == "stable":  # D measured (finite, not a freeze on a missing estimate) at every update
        assert all(math.isfinite(r["ref_divergence"]) and r["ref_frozen_step"] is None for r in rows)


def test_a_rounds_probe_is_its_preferred_clean_samples_not_the_recorded_steps(tmp_path):
    """The moving reference's probe reads the round's clean samples above their group's mean score (the
    preferred images of Kang et al.'s Eq. 8), never the noisy sampler steps a likelihood objective trains on."""
    import json

    from safetensors.torch import save_file

    from xdpo.objectives import OBJECTIVES
    from xdpo.train.rollouts import RolloutItems

    n, steps = 6, 3
    latents = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 4, 2, 2).contiguous()
    t = {"latents": latents, "advantage": torch.tensor([1.0, -1.0, 0.0, -0.5, 0.5, 2.0]),
         "group": torch.tensor([0, 0, 0, 1, 1, 1]), "grid_index": torch.arange(steps),
         "sde_x": 100 + torch.randn(n, steps, 4, 2, 2), "sde_next": torch.randn(n, steps, 4, 2, 2),
         "sde_logp": torch.zeros(n, steps), "sde_a": torch.ones(steps), "sde_b": torch.ones(steps),
         "sde_std": torch.ones(steps), "sde_t": torch.ones(steps), "sde_position": torch.arange(steps)}  # fmt: skip
    save_file(t, str(tmp_path / "rollouts.safetensors"))
    record = {"captions": ["a one", "a two"], "per_prompt": 3, "pixel_size": [16, 16], "cfg": 1.0}
    (tmp_path / "round.json").write_text(json.dumps(record))
    obj = OBJECTIVES["grpo"]
    items = RolloutItems(tmp_path, obj, {}, seed=0, r=0)
    assert items.probe_images() == [0, 4, 5]  # advantage > 0
    batch = items.probe_batch([4, 0])
    assert torch.equal(batch.latents, latents[[4, 0]]) and batch.captions == ["a two", "a one"]
    assert not batch.pairs and batch.images == 2
