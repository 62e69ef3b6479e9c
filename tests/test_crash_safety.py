"""Crash safety: SIGTERM (preemption) saves and stops, SIGKILL at random moments loses nothing that was
checkpointed and resumes bit for bit, half-written checkpoints are cleaned up, non-finite steps skip."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_training, torchrun_cmd, train_overrides
from xdpo.train.metrics import read_metrics

SAFETY = {"train.checkpoint_every": 1, "train.checkpoints_keep": 1, "model.lora_rank": 4}


def overrides(tmp_path, pipe, pairs, name, **kw):
    return train_overrides(tmp_path / name, pipe, pairs, **{**SAFETY, **kw})


def run(tmp_path, pipe, pairs, name, **kw):
    return run_training(tmp_path / name, pipe, pairs, **{**SAFETY, **kw})


def adapter(out, step):
    return load_file(out / "checkpoints" / f"step-{step}" / "adapter_model.safetensors")


def test_sigterm_finishes_the_step_saves_and_resumes(
    tmp_path, tiny_pipeline_dir, pairs_parquet, monkeypatch, capsys
):
    import xdpo.train.recipe as loop

    real, calls = loop.train_step, {"n": 0}

    def term_on_third_call(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM / Kubernetes / a spot preemption would
        return real(*args, **kw)

    monkeypatch.setattr(loop, "train_step", term_on_third_call)
    kw = {"train.max_steps": 6, "train.checkpoint_every": 0}
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_pipeline_dir, pairs_parquet, "term", **kw)
    out = tmp_path / "term"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-3"
    ]  # the step in flight finished
    assert "SIGTERM" in capsys.readouterr().out
    monkeypatch.setattr(loop, "train_step", real)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    run(tmp_path, tiny_pipeline_dir, pairs_parquet, "term", **kw, **{"train.resume_from": "latest"})
    fresh = run(tmp_path, tiny_pipeline_dir, pairs_parquet, "fresh", **kw)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    a, b = adapter(fresh, 6), adapter(out, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_half_written_checkpoints_are_ignored_and_cleaned(tmp_path, tiny_pipeline_dir, pairs_parquet):
    out = run(tmp_path, tiny_pipeline_dir, pairs_parquet, "half", **{"train.max_steps": 2})
    ckpts = out / "checkpoints"
    (ckpts / "step-3.tmp").mkdir()  # a save killed half way
    (ckpts / "step-3.tmp" / "optimizer.bin").write_bytes(b"partial")
    (ckpts / "step-2").rename(ckpts / "step-2.old")  # a kill between the two renames of a re-save
    run(
        tmp_path,
        tiny_pipeline_dir,
        pairs_parquet,
        "half",
        **{"train.max_steps": 3, "train.resume_from": "latest"},
    )
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-3"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_nonfinite_steps_skip_and_stop_after_too_many(
    tmp_path, tiny_pipeline_dir, pairs_parquet, monkeypatch
):
    import xdpo.train.recipe as loop
    from xdpo.errors import XdpoError

    real, calls = loop.train_step, {"n": 0}

    def nan_on_calls(bad):
        def step(*args, **kw):
            calls["n"] += 1
            res = real(*args, **kw)
            if calls["n"] in bad:
                res.out.loss = res.out.loss * float("nan")
            return res

        return step

    monkeypatch.setattr(loop, "train_step", nan_on_calls({2}))
    out = run(
        tmp_path,
        tiny_pipeline_dir,
        pairs_parquet,
        "skip",
        **{"train.max_steps": 3, "train.nonfinite": "skip"},
    )
    rows = read_metrics(out / "metrics.jsonl")
    assert [r.get("nonfinite_skipped") for r in rows] == [None, 1, None]
    weights = adapter(out, 3)
    assert all(torch.isfinite(v).all() for v in weights.values())

    calls["n"] = 0
    monkeypatch.setattr(loop, "train_step", nan_on_calls({1}))
    with pytest.raises(XdpoError, match="non-finite loss at step 1"):
        run(tmp_path, tiny_pipeline_dir, pairs_parquet, "stop", **{"train.max_steps": 3})

    calls["n"] = 0
    monkeypatch.setattr(loop, "train_step", nan_on_calls({1, 2, 3}))
    with pytest.raises(XdpoError, match="3 in a row"):
        run(
            tmp_path,
            tiny_pipeline_dir,
            pairs_parquet,
            "many",
            **{"train.max_steps": 5, "train.nonfinite": "skip", "train.max_nonfinite": 2},
        )


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_equal(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """Three kills at random moments (during steps, saves, startup), then a resume to the end: every step
    is logged once and the final adapter equals an uninterrupted run's, bit for bit (CPU)."""
    steps = 8
    args = overrides(tmp_path, tiny_pipeline_dir, pairs_parquet, "killed", **{"train.max_steps": steps})
    cmd = [sys.executable, "-m", "xdpo", "train", *args, "train.resume_from=latest"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rng = random.Random(0)
    out = tmp_path / "killed"
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until this attempt has made progress (a new metrics line), then kill at a random moment
        before = len(read_metrics(out / "metrics.jsonl")) if (out / "metrics.jsonl").is_file() else 0
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            done = len(read_metrics(out / "metrics.jsonl")) if (out / "metrics.jsonl").is_file() else 0
            if done > before:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.wait()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fresh = run(tmp_path, tiny_pipeline_dir, pairs_parquet, "fresh", **{"train.max_steps": steps})
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, steps + 1))
    a, b = adapter(fresh, steps), adapter(out, steps)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa = load_file(fresh / "final" / "pytorch_lora_weights.safetensors")
    fb = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old"))]


@pytest.mark.slow
def test_sigterm_with_two_processes_stops_all_at_one_step(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """torchrun forwards SIGTERM to both ranks; they agree on the step, save one checkpoint and stop."""
    out = tmp_path / "ddp"
    args = overrides(tmp_path, tiny_pipeline_dir, pairs_parquet, "ddp", **{"train.max_steps": 200})
    args += ["train.checkpoint_every=0"]
    cmd = torchrun_cmd("train", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(read_metrics(out / "metrics.jsonl")) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=240)
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-"), (saved, text[-2000:])
    step = int(saved[0].split("-")[1])
    assert 2 <= step < 200
    assert "stopped at step" in text
    ckpt = out / "checkpoints" / saved[0]
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, step + 1))
