"""Online training on rollouts (DiffusionNFT, AWM, DGPO, GRPO): exact resume in the middle of a round and between
rounds, groups never split across two processes (their scores gathered before the advantages), the reference
that samples NFT's rounds, the monitors and online.stop_on with the best round's model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import INK_REWARD, torchrun
from test_train import read_metrics, run
from xdpo.config import load_config
from xdpo.errors import ConfigError

ROLLOUTS = {
    "online.enabled": True,
    "online.every": 2,
    "online.per_prompt": 3,
    "online.scorer": "rewards:ink",
    "online.sample_steps": 3,
    "online.monitor_images": 2,
    "online.heldout_scorer": "rewards:ink:-1",
    "train.checkpoint_every": 1,
    "train.batch_size": 2,
    "reference.strategy": "soft",
    "reference.update_every": 2,
    "reference.soft_rate": 0.25,
    "data.path": "",
}
SD3 = {"data.resolution": 16, "family.max_sequence_length": 32}
CASES = {  # objective: (pipeline, overrides)
    "nft": ("tiny_sd3_pipeline_dir", {**SD3, "model.lora_rank": 4}),  # LoRA, flow, sampled by the old policy
    "dgpo": (
        "tiny_pipeline_dir",
        {"data.resolution": 32},
    ),  # full fine-tune, DDPM, whole groups per micro-batch
    "awm": ("tiny_sd3_pipeline_dir", {**SD3, "online.scheduler": "dpm++", "online.reward_norm": "gdpo"}),
    # recorded SDE steps (DDIM eta 1), CFG rerun at training, MixGRPO's window moving every round
    "grpo": (
        "tiny_pipeline_dir",
        {"data.resolution": 32, "online.guidance": 3.0, "grpo.window": 2, "grpo.window_every": 1},
    ),  # fmt: skip
}


def prompts(tmp_path):
    (tmp_path / "rewards.py").write_text(INK_REWARD)
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\na green dot\n")
    return tmp_path / "prompts.txt"


def untimed(out):
    return [{k: v for k, v in r.items() if k != "step_time"} for r in read_metrics(out)]


def same_round(a, b):
    ta, tb = load_file(a / "rollouts.safetensors"), load_file(b / "rollouts.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), a.name
    ra, rb = (json.loads((d / "round.json").read_text()) for d in (a, b))
    assert ra["monitors"] == rb["monitors"] and ra["captions"] == rb["captions"]


@pytest.mark.parametrize(
    "objective", [pytest.param(o, marks=[pytest.mark.slow] if o == "awm" else []) for o in CASES]
)
def test_rollout_training_resumes_exactly_mid_round_and_between_rounds(
    request, tmp_path, monkeypatch, objective
):
    """Rounds of 2 steps: a run stopped after 3 steps (mid round 1) and one stopped after 4 (between rounds 1 and
    2), each resumed to 5, equal an uninterrupted 5-step run: every round's rollouts (latents, scores,
    advantages), the monitors, every metric and the final weights."""
    monkeypatch.chdir(tmp_path)
    pipe_name, extra = CASES[objective]
    pipe = request.getfixturevalue(pipe_name)
    kw = {**ROLLOUTS, "online.prompts": prompts(tmp_path), "loss.objective": objective, **extra}
    fresh = run(tmp_path, pipe, "", name="fresh", **{**kw, "train.max_steps": 5})
    for stop in (3, 4):
        run(tmp_path, pipe, "", name=f"part{stop}", **{**kw, "train.max_steps": stop})
        part = run(
            tmp_path,
            pipe,
            "",
            name=f"part{stop}",
            **{**kw, "train.max_steps": 5, "train.resume_from": "latest"},
        )
        names = sorted(p.name for p in (fresh / "online").iterdir())
        assert (
            names
            == ["round-0000", "round-0001", "round-0002"]
            == sorted(p.name for p in (part / "online").iterdir())
        )
        for name in names:
            same_round(fresh / "online" / name, part / "online" / name)
        assert untimed(fresh) == untimed(part)
        weights = sorted(p.relative_to(fresh) for p in (fresh / "final").rglob("*.safetensors"))
        assert weights
        for name in weights:
            wa, wb = load_file(fresh / name), load_file(part / name)
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    rows = untimed(fresh)
    assert rows[-1]["ref_updates"] == 2 and all(np.isfinite(r["loss"]) for r in rows)
    record = json.loads((fresh / "online" / "round-0001" / "round.json").read_text())
    assert record["samples_with"] == ("reference" if objective == "nft" else "policy")
    m = record["monitors"]
    assert m["heldout"] == pytest.approx(-record["raw_mean"][0]) and m["drift"] > 0 and m["diversity"] > 0
    if objective == "grpo":  # the window moved one step a round, clamped at the end of the 3-step grid
        sde = [json.loads((fresh / "online" / n / "round.json").read_text())["sde"]["sde"] for n in names]
        assert sde == [[0, 1], [1, 2], [1, 2]] and rows[0]["ratio_at_start"] < 1e-5


def test_the_rounds_train_on_the_gathered_advantages_and_the_reference_samples_nft(
    tmp_path, tiny_sd3_pipeline_dir, monkeypatch, capsys
):
    """A round's advantages are the closed form over the whole round (global std), its grid the sampler's; with
    reference.update_every beyond the run, NFT's old policy stays the base and samples every round alike
    (drift 0), while AWM samples with the moving policy. The run's summary names no beta or divergence (the
    rollout objectives take neither)."""
    monkeypatch.chdir(tmp_path)
    for objective in ("nft", "awm"):
        out = run(tmp_path, tiny_sd3_pipeline_dir, "", name=objective, **{
            **ROLLOUTS, **SD3, "online.prompts": prompts(tmp_path), "loss.objective": objective,
            "reference.update_every": 100, "train.max_steps": 4, "train.learning_rate": 1e-2,
        })  # fmt: skip
        t = load_file(out / "online" / "round-0001" / "rollouts.safetensors")
        s, g = t["score"].numpy(), t["group"].numpy()
        means = np.array([s[g == k].mean() for k in g])
        np.testing.assert_allclose(t["advantage"].numpy(), (s - means) / (s.std() + 1e-4), rtol=1e-12)
        grid = t["grid_index"].tolist()  # 3 Euler steps as training timestep indices, the first pure noise
        assert len(grid) == 3 and grid[0] == 999 and grid == sorted(grid, reverse=True)
        drift = json.loads((out / "online" / "round-0001" / "round.json").read_text())["monitors"]["drift"]
        assert (drift == 0) == (objective == "nft")
        text = capsys.readouterr().out
        assert f"; {objective}; reference soft;" in text and "beta=" not in text


def test_rollout_objectives_need_online_rounds_and_stop_on_a_heldout_scorer():
    base = ["model.pretrained=m", "data.path=d"]
    with pytest.raises(ConfigError, match="online.enabled=true"):
        load_config(None, [*base, "loss.objective=nft"])
    with pytest.raises(ConfigError, match="online.stop_on"):
        load_config(None, [*base, "online.stop_on=2"])
    cfg = load_config(None, ["model.pretrained=m", "data.path=", "loss.objective=dgpo", "online.enabled=true",
                             "online.prompts=p", "online.scorer=s", "dgpo.beta=2000", "dgpo.reference=reference"])  # fmt: skip
    assert cfg.dgpo.beta == 2000 and cfg.dgpo.reference == "reference"


def test_stop_on_keeps_the_best_round(tmp_path, tiny_sd3_pipeline_dir, monkeypatch):
    """A held-out reward that falls every round (its score is minus the step) stops the run before round 2 with
    online.stop_on=1 after round 1 fell; best/ holds round 0's model (the base)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "held.py").write_text(
        "import json, pathlib\n"
        "def score(images, prompts):\n"
        "    n = len(list(pathlib.Path('out/online').glob('round-*')))\n"
        "    return [-float(n)] * len(images)\n"
    )
    out = run(tmp_path, tiny_sd3_pipeline_dir, "", name="out", **{
        **ROLLOUTS, **SD3, "online.prompts": prompts(tmp_path), "loss.objective": "awm", "train.max_steps": 8,
        "online.heldout_scorer": "held:score", "online.stop_on": 1,
    })  # fmt: skip
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    records = [json.loads((out / "online" / f"round-000{r}" / "round.json").read_text()) for r in (0, 1)]
    assert [r["best"] for r in records] == [True, False] and records[1]["stop"] and not records[0]["stop"]
    assert json.loads((out / "best" / "xdpo.json").read_text())["step"] == 0 and (out / "final").is_dir()


@pytest.mark.slow
def test_two_processes_deal_whole_groups_and_gather_their_scores(tmp_path, tiny_pipeline_dir):
    """2 CPU processes, 3 groups of 3: each group is sampled and scored on one process (both take part), and
    the advantages every process trains on are the closed form over all 9 images, not over a process's share."""
    (tmp_path / "rewards.py").write_text(INK_REWARD)
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\na green dot\n")
    out = tmp_path / "two"
    kw = {**ROLLOUTS, "online.prompts": tmp_path / "prompts.txt", "model.pretrained": tiny_pipeline_dir,
          "output_dir": out, "data.resolution": 32, "loss.objective": "dgpo", "train.max_steps": 2,
          "train.batch_size": 1, "train.learning_rate": 1e-4, "train.warmup_steps": 0}  # fmt: skip
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    torchrun("train", *[f"{k}={v}" for k, v in kw.items()], env={"PYTHONPATH": path})
    t = load_file(out / "online" / "round-0000" / "rollouts.safetensors")
    proc, g, s = t["process"].numpy(), t["group"].numpy(), t["score"].numpy()
    assert set(proc) == {0, 1} and all(len(set(proc[g == k])) == 1 for k in set(g))
    means = np.array([s[g == k].mean() for k in g])
    np.testing.assert_allclose(t["advantage"].numpy(), (s - means) / (s.std() + 1e-4), rtol=1e-12)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


@pytest.mark.slow
def test_fsdp_nft_lora_samples_with_the_sharded_old_policy_and_resumes(tmp_path, tiny_pipeline_dir):
    """FSDP2 on 2 processes, LoRA: DiffusionNFT's rounds are sampled by the soft reference written into the
    sharded adapters (every process as many pipeline calls), the reference blended once a round, and a resume
    mid-round continues."""
    from test_fsdp import FSDP_ENV

    out, log = _fsdp_lora_rollouts_3_then_5(tmp_path, tiny_pipeline_dir, FSDP_ENV, {"loss.objective": "nft"})
    assert "Resuming from" in log
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["ref_updates"] == 2
    assert sorted(p.name for p in (out / "online").iterdir()) == ["round-0000", "round-0001", "round-0002"]
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_grpo_lora_records_and_recomputes_log_probs_on_sharded_weights_and_resumes(
    tmp_path, tiny_pipeline_dir
):
    """FSDP2 on 2 processes, LoRA, GRPO: each process samples its groups with the stochastic sampler (as many
    pipeline calls on every process), the recorded steps of all processes are merged, the log-probs recomputed
    on the sharded policy equal the recorded ones at the first update, and a resume mid-round continues."""
    from test_fsdp import FSDP_ENV

    extra = {"loss.objective": "grpo", "reference.strategy": "frozen", "online.guidance": 3.0}
    out, log = _fsdp_lora_rollouts_3_then_5(tmp_path, tiny_pipeline_dir, FSDP_ENV, extra)
    assert "Resuming from" in log
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(rows[i]["ratio_at_start"] < 1e-4 for i in (0, 2, 4))
    t = load_file(str(out / "online" / "round-0000" / "rollouts.safetensors"))
    assert t["sde_x"].shape[:2] == (9, 2) and torch.isfinite(t["sde_logp"]).all()


def _fsdp_lora_rollouts_3_then_5(tmp_path, pipe, fsdp_env: dict, overrides: dict) -> tuple:
    """An FSDP2 LoRA rollout run of `overrides` on 2 processes (the ink reward, three prompts): 3 steps, then
    resumed to 5; (output folder, the resumed run's log)."""
    (tmp_path / "rewards.py").write_text(INK_REWARD)
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\na green dot\n")
    out = tmp_path / "fsdp"
    kw = {**ROLLOUTS, "online.prompts": tmp_path / "prompts.txt", "model.pretrained": pipe, "output_dir": out,
          "data.resolution": 32, "model.lora_rank": 4, "train.learning_rate": 1e-3, "train.warmup_steps": 0,
          "train.scale_lr": False, **overrides}  # fmt: skip
    env = {**fsdp_env, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    torchrun("train", *[f"{k}={v}" for k, v in {**kw, "train.max_steps": 3}.items()], env=env)
    resume = {**kw, "train.max_steps": 5, "train.resume_from": "latest"}
    return out, torchrun("train", *[f"{k}={v}" for k, v in resume.items()], env=env)
