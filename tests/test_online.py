"""Online DPO (`online.enabled`): rounds of on-policy pairs, exact resume across rounds, and as many sampling
calls on every process where forwards are collectives."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors.torch import load_file

from test_train import read_metrics, run
from xdpo.config import load_config


@pytest.mark.slow
def test_online_rounds_resume_exactly(tmp_path, monkeypatch):
    """Online DPO on the digits base: rounds of 2 steps regenerate pairs from the policy; stopping after
    3 steps (mid-round 2) and resuming to 5 equals an uninterrupted 5-step run, pairs and weights alike."""
    (tmp_path / "rewards.py").write_text(
        "import numpy as np\n"
        "def ink(images, prompts):\n"
        "    return [float(np.asarray(im.convert('L'), dtype=np.float64).mean()) for im in images]\n"
    )
    monkeypatch.chdir(tmp_path)
    kw = {
        "model.pretrained": "digits",
        "data.resolution": 32,
        "online.enabled": True,
        "online.every": 2,
        "online.prompts": "digits",
        "online.per_prompt": 2,
        "online.scorer": "rewards:ink",
        "online.sample_steps": 3,
        "train.checkpoint_every": 1,
        "model.lora_rank": 4,
        "data.path": "",
    }
    fresh = run(tmp_path, "digits", "", name="fresh", **{**kw, "train.max_steps": 5})
    run(tmp_path, "digits", "", name="part", **{**kw, "train.max_steps": 3})
    part = run(
        tmp_path, "digits", "", name="part", **{**kw, "train.max_steps": 5, "train.resume_from": "latest"}
    )
    rounds = sorted(p.name for p in (fresh / "online").iterdir())
    assert rounds == ["round-0000.parquet", "round-0001.parquet", "round-0002.parquet"]
    import pyarrow.parquet as pq

    for name in rounds:
        a, b = pq.read_table(fresh / "online" / name), pq.read_table(part / "online" / name)
        assert a.equals(b), name  # the same policy at each round start: the same images and scores
    assert [r["loss"] for r in read_metrics(fresh)] == [r["loss"] for r in read_metrics(part)]
    wa = load_file(fresh / "final" / "pytorch_lora_weights.safetensors")
    wb = load_file(part / "final" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    ("mode", "calls"), [("MULTI_CPU", [1]), ("FSDP", [1, None]), ("DEEPSPEED", [1, None])]
)
def test_online_round_pads_sampling_calls_when_forwards_are_collectives(
    tmp_path, tiny_pipeline_dir, monkeypatch, mode, calls
):
    """3 prompts on 2 processes: process 1 samples prompt 1; under FSDP or ZeRO-3 (forwards gather the
    parameters from every process) it makes a second, discarded call so both make 2 and none waits forever."""
    import xdpo.pairs.generate as generate
    from xdpo.models.load import load_components
    from xdpo.rollout.rounds import PairRounds

    made: list = []

    def fake_sample(pipe, records, *, first_index, **kw):
        made.append(first_index)
        return {"caption": [records[0]["prompt"]], "first_index": [first_index]}

    monkeypatch.setattr(generate, "sample_and_pair", fake_sample)
    monkeypatch.setattr(generate, "write_columns", lambda path, cols: made.append(("wrote", cols)))
    (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
    cfg = load_config(None, [f"model.pretrained={tiny_pipeline_dir}", "data.path=", "online.enabled=true",
                             f"online.prompts={tmp_path / 'prompts.txt'}", "online.scorer=x"])  # fmt: skip
    comps = load_components(cfg.model, cfg.family)
    plugin = type("Plugin", (), {"zero_stage": 3})()
    accelerator = type("Acc", (), {
        "process_index": 1, "num_processes": 2, "is_main_process": False, "wait_for_everyone": lambda self: None,
        "distributed_type": type("T", (), {"name": mode})(), "state": type("S", (), {"deepspeed_plugin": plugin})(),
        "device": torch.device("cpu"), "autocast": lambda self: contextlib.nullcontext(),
    })()  # fmt: skip
    PairRounds(cfg, comps, accelerator, tmp_path, reward=lambda *a: None)(0, comps.denoiser)
    assert [c for c in made if not isinstance(c, tuple)] == [1 if c == 1 else 0 for c in calls]
    assert made[-1] == ("wrote", {"caption": ["b"], "first_index": [1]})  # the padding call is discarded
