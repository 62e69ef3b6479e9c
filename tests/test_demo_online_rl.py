"""`xdpo demo --online-rl`: the arms sample equal numbers of images, the noisy labeller is reproducible and noisy,
and a tiny run writes the report with reward against images sampled and compute seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from xdpo.apps.demo.online_rl import OnlineRLSettings, noisy_reward, run_online_rl
from xdpo.cli import main
from xdpo.config import load_config


def test_every_arm_samples_the_same_number_of_images(tmp_path):
    s = OnlineRLSettings.make_rl(tmp_path)
    cfgs = {m.slug: load_config(None, [f"model.pretrained={s.base}", *m.overrides]) for m in s.methods}
    images = {k: c.online.prompts_per_round * c.online.per_prompt * (s.max_steps // c.online.every)
              for k, c in cfgs.items()}  # fmt: skip
    assert set(images.values()) == {s.images} == {320}
    assert [m.slug for m in s.methods][-6:] == [
        "grpo",
        "grpo-window",
        "dpok",
        "d3po",
        "dgpo-stable",
        "d3po-stable",
    ]
    assert cfgs["grpo-window"].grpo.window == 4 and cfgs["d3po"].reference.strategy == "frozen"
    for slug in ("dgpo-stable", "d3po-stable"):  # Kang et al.'s update once a round, Eq. 8's guard
        ref = cfgs[slug].reference
        assert (ref.strategy, ref.update_every, ref.divergence) == ("stable", s.every, "kang")
        assert cfgs[slug].loss.objective == slug.split("-")[0]
    assert cfgs["dgpo-stable"].train.batch_size == cfgs["dgpo"].train.batch_size
    # the stable reference is DGPO's DPO term's (its default, the initial model, would leave it only the clip)
    assert (cfgs["dgpo"].dgpo.reference, cfgs["dgpo-stable"].dgpo.reference) == ("initial", "reference")
    emaref = cfgs["dgpo-emaref"]  # the control: the same DPO term's reference, moved by EMA instead
    assert (emaref.dgpo.reference, emaref.reference.strategy) == (
        "reference",
        cfgs["dgpo"].reference.strategy,
    )
    assert cfgs["dgpo-stable"].dgpo.beta == cfgs["dgpo"].dgpo.beta
    assert cfgs["offline"].online.every == s.max_steps and cfgs["nft"].loss.objective == "nft"
    assert {c.online.scorer for c in cfgs.values()} == {"xdpo.apps.demo.online_rl:noisy_reward"}


def test_the_noisy_labeller_is_reproducible_and_noisy():
    ims = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (0, 40, 80, 120)] * 20
    prompts = ["a handwritten digit one"] * 80
    a, b = noisy_reward(ims, prompts), noisy_reward(ims, prompts)
    from xdpo.apps.digits.labeller import hidden_reward

    noise = a - hidden_reward(ims, prompts)
    assert np.array_equal(a, b) and len(set(np.round(noise[:4], 9))) == 4
    assert np.allclose(noise[:4], noise[4:8])  # the same image and prompt: the same draw


def test_online_rl_is_its_own_demo(capsys):
    assert main(["demo", "--online-rl", "--online", "--out", "unused"]) == 2
    assert "--online-rl is its own demo" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tiny_online_rl_demo_writes_its_report(tmp_path):
    arms = ("d3po-stable", "offline", "online-dpo", "nft", "grpo-window", "d3po")  # run in the demo's order
    s = OnlineRLSettings.make_rl(
        tmp_path / "rl", quick=True, family="flow", prompts_per_round=2, every=2, arms=arms
    )
    report = run_online_rl(s.out, settings=s)
    res = json.loads((s.out / "results.json").read_text())
    slugs = ["offline", "online-dpo", "nft", "grpo-window", "d3po", "d3po-stable"]
    assert [a["slug"] for a in res["arms"]] == slugs
    for arm in res["arms"]:
        assert [p["images"] for p in arm["points"]] == (
            [0, 16, 16] if arm["slug"] == "offline" else [0, 8, 16]
        )
        assert arm["points"][-1]["seconds"] > 0 and np.isfinite(arm["reward"][0])
        assert arm["per_seed"]["reward"][0] == pytest.approx(arm["reward"][0])  # one seed: its own mean
    text = report.read_text()
    assert "**one training seed**" in text and (s.out / "curves.png").is_file()
    assert "No intervals" not in text  # one seed: the images' bootstrap interval
    assert "One seed: the decoupled and the likelihood-based arms are not separated" in text
    track = res["arms"][-1]["reference"][0]  # the stable arm's checks: once a round, the policy copied
    assert [row[0] for row in track] == [2, 4] and track[-1][4] == 2 and track[-1][3] == 0.0
    assert "- D3PO + Kang stable minus D3PO, final hidden reward paired by seed" in text
    assert "one seed: no interval, no verdict" in text and "2 copies, never frozen" in text


def test_kang_lines_give_a_verdict_only_where_the_paired_interval_excludes_zero():
    from xdpo.apps.demo.online_rl_report import kang_lines

    def arm(slug, rewards):
        track = [[10, 3.0, 0.01, 0.0, 1, None]] if slug.endswith("stable") else []
        return {"slug": slug, "name": slug, "seeds": [0, 1, 2], "per_seed": {"reward": rewards},
                "reference": [track]}  # fmt: skip

    up = kang_lines([arm("dgpo", [1.0, 2.0, 3.0]), arm("dgpo-stable", [1.1, 2.2, 3.15])])
    assert len(up) == 1 and "+0.150" in up[0] and "raises the final reward" in up[0]
    flat = kang_lines([arm("d3po", [1.0, 2.0, 3.0]), arm("d3po-stable", [1.3, 1.8, 3.0])])
    assert "not separated from 0" in flat[0] and "1 copies, never frozen" in flat[0]
    down = kang_lines([arm("d3po", [1.0, 2.0, 3.0]), arm("d3po-stable", [0.9, 1.85, 2.9])])
    assert "lowers the final reward" in down[0]
    assert kang_lines([arm("d3po", [1.0, 2.0, 3.0])]) == []  # no stable arm: nothing said
    both = kang_lines([arm("dgpo", [1.0, 2.0, 3.0]), arm("dgpo-emaref", [1.2, 2.1, 3.1]),
                       arm("dgpo-stable", [1.1, 2.2, 3.15])])  # fmt: skip
    assert [line.split(",")[0] for line in both] == [
        "- dgpo-stable minus dgpo",
        "- dgpo-stable minus dgpo-emaref",
    ]


def test_three_seeds_by_default_and_one_when_quick(tmp_path, capsys):
    assert OnlineRLSettings.make_rl(tmp_path).train_seeds == (0, 1, 2)
    assert OnlineRLSettings.make_rl(tmp_path, quick=True).train_seeds == (0,)
    assert OnlineRLSettings.make_rl(tmp_path, seeds=5).train_seeds == (0, 1, 2, 3, 4)
    assert main(["demo", "--online-rl", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds: expected a number of training seeds >= 1, got 0" in capsys.readouterr().err
    assert main(["demo", "--seeds", "2", "--out", str(tmp_path)]) == 2
    assert "--seeds and --arms apply to --online-rl only" in capsys.readouterr().err


def test_arms_pick_a_subset_by_slug_and_the_help_names_every_slug(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at hyphens: keep every slug on one line
    every = [m.slug for m in OnlineRLSettings.make_rl(tmp_path).methods]
    s = OnlineRLSettings.make_rl(tmp_path, arms=("d3po-stable", "dgpo"))
    assert [m.slug for m in s.methods] == ["dgpo", "d3po-stable"]
    assert main(["demo", "--online-rl", "--arms", "dgpo,sft", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--arms: unknown sft (choose from " in err and all(slug in err for slug in every)
    assert main(["demo", "--arms", "dgpo", "--out", str(tmp_path)]) == 2
    assert "--seeds and --arms apply to --online-rl only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert all(slug in helptext for slug in every)


def _arm(name: str, rewards: list[float]) -> dict:
    from xdpo.evaluate.stats import t_interval

    return {"name": name, "reward": t_interval(rewards)}


def test_verdicts_follow_the_intervals():
    from scipy.stats import t

    from xdpo.apps.demo.online_rl_report import verdicts

    # seeds 2.0, 2.1, 2.2: mean 2.1, half-width t_{0.975,2} * 0.1 / sqrt 3 = 0.2484
    a = _arm("A", [2.0, 2.1, 2.2])
    assert a["reward"][1] == pytest.approx(2.1 - t.ppf(0.975, 2) * 0.1 / 3**0.5)
    far, near = _arm("B", [1.0, 1.1, 1.2]), _arm("C", [1.85, 1.95, 2.05])
    lead = verdicts([far, a], base_mean=0.5)
    assert lead[0].startswith("- A ends highest (2.100") and "clears every other arm's" in lead[0]
    assert lead[1] == "- Above the base (0.500) at the lower end of the interval: B, A."
    tied = verdicts([a, near, far], base_mean=1.5)
    assert (
        tied[0]
        == "- Highest mean final hidden reward: A (2.100), not separated from C (their intervals overlap its)."
    )
    assert tied[1].endswith("A, C; not shown above it: B.")
    single = verdicts([{"name": "A", "reward": (2.0, float("nan"), float("nan"))}], base_mean=0.0)
    assert single == ["- No intervals (one seed, one image): no arm is separated from another."]


def test_the_speedup_line_follows_the_intervals():
    from xdpo.apps.demo.online_rl_report import speedup

    def arm(slug: str, rewards: list[float], seconds: float) -> dict:
        return {**_arm(slug.upper(), rewards), "slug": slug, "points": [{"seconds": seconds}]}

    rows = [
        arm("nft", [2.0, 2.1, 2.2], 30),
        arm("awm", [1.0, 1.1, 1.2], 30),
        arm("grpo", [1.0, 1.05, 1.1], 40),
    ]
    line = speedup(rows)[0]
    assert line.startswith(
        "- Best decoupled arm NFT (2.100) vs best likelihood-based arm GRPO (1.050), compute 30 s"
    )
    assert "the decoupled arm ends higher at equal images sampled" in line
    rows.append(arm("d3po", [1.9, 2.0, 2.1], 50))
    assert "their intervals overlap" in speedup(rows)[0]
    assert "says nothing" in speedup(rows[:2])[0]


def test_a_win_rate_interval_stays_within_0_and_1():
    from xdpo.apps.demo.online_rl_report import _rate_interval

    m, lo, hi = _rate_interval([0.6, 0.39, 0.95])  # the t interval alone: [-0.056, 1.349]
    assert m == pytest.approx(0.6466667) and lo == 0.0 and hi == 1.0
    assert _rate_interval([0.5, 0.6, 0.7])[1:] == pytest.approx((0.35159, 0.84841), abs=1e-4)  # inside: kept


def test_the_slant_task_trains_on_its_noisy_reward_and_scores_its_hidden_one(tmp_path):
    """`task="slant"` (the study's noisy task): every arm trains on the slant reward + the same Gumbel noise as
    the bold task's labeller and monitors `digits-reward-slant`; evaluation scores the slant reward."""
    from xdpo.apps.demo.online_rl import noisy_slant_reward
    from xdpo.apps.demo.run import DemoSettings
    from xdpo.apps.digits.labeller import hidden_reward
    from xdpo.apps.digits.tasks import slant_reward

    s = OnlineRLSettings.make_rl(tmp_path, task="slant")
    over = {o for m in s.methods for o in m.overrides if o.startswith("online.")}
    assert "online.scorer=xdpo.apps.demo.online_rl:noisy_slant_reward" in over
    assert "online.heldout_scorer=digits-reward-slant" in over and not any(
        "=digits-reward," in o for o in over
    )
    ims = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (0, 40, 80, 120)]
    prompts = ["a handwritten digit one"] * 4
    noise = noisy_reward(ims, prompts) - hidden_reward(ims, prompts)
    assert np.allclose(noisy_slant_reward(ims, prompts) - slant_reward(ims, prompts), noise)
    assert DemoSettings(tmp_path).task == "bold"  # every earlier demo keeps its reward
