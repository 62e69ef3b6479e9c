"""Online DPO (`online.enabled`): rounds of on-policy pairs, exact resume across rounds, and as many sampling
calls on every process where forwards are collectives."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import load_file

from conftest import INK_REWARD
from test_train import read_metrics, run
from xdpo.config import load_config

ONLINE = {
    "online.enabled": True,
    "online.every": 2,
    "online.per_prompt": 2,
    "online.scorer": "rewards:ink",
    "online.sample_steps": 3,
    "train.checkpoint_every": 1,
    "data.path": "",
}
SD3 = {"data.resolution": 16, "model.max_sequence_length": 32}  # the tiny SD3 pipeline samples 16 x 16 px
RESUMED = {  # reference strategy: (pipeline, overrides)
    "frozen": ("digits", {"model.lora_rank": 4, "data.resolution": 32}),
    "periodic": (  # LoRA, bf16: sampling under autocast, D on round 0's probe set after the resume
        "tiny_sd3_pipeline_dir",
        {
            **SD3,
            "model.lora_rank": 4,
            "train.mixed_precision": "bf16",
            "reference.strategy": "periodic",
            "reference.update_every": 2,
            "reference.max_divergence": 10,
        },
    ),
    "ema": ("tiny_sd3_pipeline_dir", {**SD3, "reference.strategy": "ema", "reference.update_every": 1}),
}


@pytest.mark.parametrize(
    "strategy", [pytest.param(s, marks=[pytest.mark.slow] if s == "frozen" else []) for s in RESUMED]
)
def test_online_rounds_resume_exactly(request, tmp_path, monkeypatch, any_precision, strategy):
    """Online DPO with each reference strategy: rounds of 2 steps regenerate pairs from the policy; stopping
    after 3 steps (mid-round 1) and resuming to 5 equals an uninterrupted 5-step run: round files, every
    metric of every step (the periodic reference's divergence D included) and the final weights."""
    import pyarrow.parquet as pq

    (tmp_path / "rewards.py").write_text(INK_REWARD)
    monkeypatch.chdir(tmp_path)
    pipe, extra = RESUMED[strategy]
    pipe = pipe if pipe == "digits" else request.getfixturevalue(pipe)
    prompts = "digits" if pipe == "digits" else tmp_path / "prompts.txt"
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\na green dot\n")
    kw = {**ONLINE, "online.prompts": prompts, **extra}
    fresh = run(tmp_path, pipe, "", name="fresh", **{**kw, "train.max_steps": 5})
    any_precision()
    run(tmp_path, pipe, "", name="part", **{**kw, "train.max_steps": 3})
    any_precision()
    part = run(tmp_path, pipe, "", name="part", **{**kw, "train.max_steps": 5, "train.resume_from": "latest"})
    rounds = sorted(p.name for p in (fresh / "online").iterdir())
    assert rounds == ["round-0000", "round-0001", "round-0002"]
    for name in rounds:
        a, b = (pq.read_table(d / "online" / name / "pairs.parquet") for d in (fresh, part))
        assert a.equals(b), name  # the same policy at each round start: the same images and scores
    untimed = [
        {k: v for k, v in r.items() if k != "step_time"} for r in read_metrics(fresh) + read_metrics(part)
    ]
    assert untimed[:5] == untimed[5:]
    if strategy == "periodic":
        assert [r["ref_updates"] for r in untimed[:5]] == [0, 1, 1, 2, 2] and untimed[3]["ref_divergence"] > 0
    weights = sorted(p.relative_to(fresh) for p in (fresh / "final").rglob("*.safetensors"))
    assert weights
    for name in weights:
        wa, wb = load_file(fresh / name), load_file(part / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.mark.parametrize("mode", ["MULTI_CPU", "FSDP", "DEEPSPEED"])
def test_online_round_samples_without_inference_mode_where_parameters_are_partitioned(
    tmp_path, tiny_pipeline_dir, mode
):
    """FSDP2 and ZeRO-3 gather the parameters inside the sampling forwards; gathered under inference mode they
    become inference tensors that the next training step cannot use (FSDP2: "Inplace update to inference
    tensor outside InferenceMode"; ZeRO-3: "Inference tensors cannot be saved for backward"). A round samples
    under no_grad there, under inference mode elsewhere."""
    import numpy as np

    from xdpo.models.load import load_components
    from xdpo.rollout.rounds import PairRounds

    (tmp_path / "prompts.txt").write_text("a\n")
    cfg = load_config(None, [f"model.pretrained={tiny_pipeline_dir}", "data.path=", "online.enabled=true",
                             f"online.prompts={tmp_path / 'prompts.txt'}", "online.scorer=x",
                             "online.per_prompt=2", "online.sample_steps=1"])  # fmt: skip
    comps = load_components(cfg.model, cfg.family)
    seen = []
    comps.denoiser.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
    )
    plugin = type("Plugin", (), {"zero_stage": 3})()
    accelerator = type("Acc", (), {
        "process_index": 0, "num_processes": 1, "is_main_process": True, "wait_for_everyone": lambda self: None,
        "distributed_type": type("T", (), {"name": mode})(), "state": type("S", (), {"deepspeed_plugin": plugin})(),
        "device": torch.device("cpu"), "autocast": lambda self: contextlib.nullcontext(),
        "print": lambda self, *a, **k: None,
    })()  # fmt: skip

    def reward(images, prompts):
        return np.arange(len(images), dtype=np.float64)

    path = PairRounds(cfg, comps, accelerator, tmp_path, reward=reward)(0, comps.denoiser)
    assert (path / "pairs.parquet").is_file() and seen
    assert set(seen) == {(mode == "MULTI_CPU", False)}


@pytest.mark.parametrize("partitioned", [False, True])
def test_a_process_pads_its_pipeline_calls_when_forwards_are_collectives(partitioned):
    """3 groups of 2 images on 2 processes, 2 images a call: process 1 samples group 1 (one call); where forwards
    are collectives (FSDP2, ZeRO-3) it makes a second, discarded call, as many as process 0's two."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from xdpo.rollout.engine import RolloutEngine
    from xdpo.rollout.groups import RoundPlan, sample_and_score

    calls = []

    class Pipe:
        def set_progress_bar_config(self, **kw):
            pass

        def __call__(self, prompt, generator, **kw):
            calls.append(list(prompt))
            return SimpleNamespace(images=[Image.new("RGB", (4, 4), (10 * len(p),) * 3) for p in prompt])

    def gather(objects):  # what process 0 contributes: groups 0 and 2
        return [([(i, 0, [0.0]) for i in (0, 1, 4, 5)], 1.0), *objects]

    plan = RoundPlan(("a", "bb", "c"), (0, 1, 2), per_prompt=2, seed=0)
    engine = RolloutEngine(Pipe(), steps=1, guidance=1.0, batch_images=2, keep_latents=False)
    got = sample_and_score(engine, plan, lambda ims, ps: np.full(len(ims), 5.0), rank=1, world=2, gather=gather,
                           pad_calls=partitioned)  # fmt: skip
    assert calls == ([["bb", "bb"], [""]] if partitioned else [["bb", "bb"]])  # the padding call discarded
    assert [j.index for j in got.jobs] == [2, 3] and len(got.samples.images) == 2
    assert got.process.tolist() == [0, 0, 1, 1, 0, 0] and got.raw[2:4, 0].tolist() == [5.0, 5.0]
