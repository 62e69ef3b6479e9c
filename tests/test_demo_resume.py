"""The demo resumes inside a stage: sampling keeps its finished batches (pairs, final-model samples) and the
reward curves their scored checkpoints; a rerun redoes none of them and gives what one run would."""

from __future__ import annotations

import json

import numpy as np
import pytest


class Interrupt:
    """The pipeline's __call__, counted, raising KeyboardInterrupt on call number `at` (0 = never); set it
    on the class with `install`."""

    def __init__(self, real, at: int = 0) -> None:
        self.real, self.at, self.calls = real, at, 0

    def install(self, monkeypatch, cls) -> Interrupt:
        def call(pipe, *args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
            return self.real(pipe, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", call)
        return self


def _pipe(tiny_pipeline_dir):
    from xdpo.evaluate.pipeline import load_pipeline

    return load_pipeline(tiny_pipeline_dir, scheduler="ddim", device="cpu", dtype="fp32")


def test_generate_resumes_at_the_first_unfinished_batch(tmp_path, tiny_pipeline_dir, monkeypatch):
    from xdpo.evaluate.pipeline import generate

    pipe = _pipe(tiny_pipeline_dir)
    prompts = [f"the number {i}" for i in range(6)]
    kw = {"seed": 5, "steps": 2, "guidance": 3.0, "batch_size": 2, "progress": False}
    whole = generate(pipe, prompts, **kw)
    cls, real = type(pipe), type(pipe).__call__
    Interrupt(real, at=3).install(monkeypatch, cls)
    with pytest.raises(KeyboardInterrupt):
        generate(pipe, prompts, chunks=tmp_path / "parts", **kw)
    spy = Interrupt(real).install(monkeypatch, cls)
    again = generate(pipe, prompts, chunks=tmp_path / "parts", **kw)
    assert spy.calls == 1  # only the third batch
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(whole, again, strict=True))
    spy.calls = 0
    generate(pipe, prompts, chunks=tmp_path / "parts", **{**kw, "seed": 6})  # other inputs: all sampled anew
    assert spy.calls == 3


def test_sample_images_resumes_inside_a_model(tmp_path, tiny_pipeline_dir, monkeypatch):
    import diffusers

    from xdpo.evaluate.sample import read_manifest, sample_images

    prompts, seeds = ["a", "b", "c"], [0, 1]
    kw = {"steps": 2, "guidance": 3.0, "scheduler": "ddim", "batch_size": 2, "progress": False}
    whole = sample_images(tiny_pipeline_dir, prompts, seeds, out_dir=tmp_path / "whole", **kw)
    cls = diffusers.StableDiffusionPipeline
    real = cls.__call__
    Interrupt(real, at=3).install(monkeypatch, cls)
    with pytest.raises(KeyboardInterrupt):
        sample_images(tiny_pipeline_dir, prompts, seeds, out_dir=tmp_path / "cut", resume=True, **kw)
    spy = Interrupt(real).install(monkeypatch, cls)
    cut = sample_images(tiny_pipeline_dir, prompts, seeds, out_dir=tmp_path / "cut", resume=True, **kw)
    assert spy.calls == 1
    a, b = read_manifest(whole), read_manifest(cut)
    assert [(r["prompt"], r["seed"], r["file"]) for r in a] == [
        (r["prompt"], r["seed"], r["file"]) for r in b
    ]
    from PIL import Image

    for r in a:
        assert np.array_equal(
            np.asarray(Image.open(whole / r["file"])), np.asarray(Image.open(cut / r["file"]))
        )


def test_reward_curves_resume_at_the_first_unscored_checkpoint(tmp_path, monkeypatch):
    from xdpo.apps.demo import run as demo

    runs = {}
    for slug in ("dpo", "sft"):
        out = tmp_path / "runs" / f"{slug}-s0"
        for step in (2, 4):
            (out / "checkpoints" / f"step-{step}").mkdir(parents=True)
            (out / "checkpoints" / f"step-{step}" / "trainer_state.json").write_text("{}")
        runs[(slug, 0)] = out
    scored = []

    class Evaluator:
        def __init__(self, n_seeds, model, task="bold"):
            pass

        def score(self, denoiser=None):
            scored.append(denoiser)
            if len(scored) == stop_at[0]:
                raise KeyboardInterrupt
            return (float(len(str(denoiser))), 0.5)

    stop_at = [4]  # base, dpo@2, dpo@4, then stopped at sft@2
    monkeypatch.setattr(demo, "SameSeedEvaluator", Evaluator)
    monkeypatch.setattr("xdpo.models.denoiser.load_denoiser", lambda path: path.name)
    s = demo.DemoSettings.make(tmp_path, quick=True)
    with pytest.raises(KeyboardInterrupt):
        demo.reward_curves(s, runs)
    stop_at[0] = 0
    scored.clear()
    curves = demo.reward_curves(s, runs)
    assert scored == ["step-2", "step-4"]  # sft's two checkpoints only: the base and dpo's were kept
    assert [p[0] for p in curves["runs"]["sft-s0"]] == [0, 2, 4]
    assert json.loads((tmp_path / "curves.json").read_text())["runs"]["dpo-s0"][1][1] == len("step-2")
