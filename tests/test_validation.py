"""Validation during training: the base model's images at step 0, the grids, scores and monitors, the report,
the trackers, the held-out stop rule and best/, resume; and the model card written into final/."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import INK_REWARD, run_training
from xdpo.config import load_config
from xdpo.errors import ConfigError
from xdpo.train.validation import watch

SEEDS = "0,1"


@pytest.fixture
def prompts(tmp_path, monkeypatch):
    """A two-prompt file, and the `rewards:ink` plugin importable."""
    (tmp_path / "rewards.py").write_text(INK_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "prompts.txt"
    path.write_text("a red square\na blue circle\n")
    return path


def validated(prompts, **overrides):
    return {"validation.prompts": str(prompts), "validation.seeds": SEEDS, "validation.every": 2,
            "validation.steps": 2, "model.lora_rank": 4, "train.max_steps": 2, **overrides}  # fmt: skip


def history(out):
    return [json.loads(line) for line in (out / "validation" / "history.jsonl").read_text().splitlines()]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_step0_images_are_the_base_pipelines_and_training_moves_them(
    tmp_path, tiny_pipeline_dir, pairs_parquet, prompts
):
    from xdpo.evaluate.sample import read_manifest, sample_images

    over = validated(prompts, **{"validation.scorers": "rewards:ink"})
    out = run_training(tmp_path / "run", tiny_pipeline_dir, pairs_parquet, **over)
    base = sample_images(tiny_pipeline_dir, prompts, SEEDS, out_dir=tmp_path / "base", steps=2, guidance=7.5,
                         scheduler="ddim", batch_size=2, device="cpu", progress=False)  # fmt: skip
    rows = read_manifest(base)
    assert len(rows) == 4
    for i, r in enumerate(rows):  # prompt-major, a column per seed
        name = f"{i // 2:03d}-s{r['seed']}.png"
        assert np.array_equal(pixels(out / "validation" / "step-000000" / name), pixels(base / r["file"]))
    moved = [
        not np.array_equal(pixels(f), pixels(out / "validation" / "step-000000" / f.name))
        for f in sorted((out / "validation" / "step-000002").glob("*.png"))
    ]
    assert len(moved) == 4 and any(moved)  # the trained policy samples, not the base
    h = history(out)
    assert [r["step"] for r in h] == [0, 2]
    assert h[0]["drift"] == 0.0 and h[1]["drift"] > 0 and h[0]["diversity"] > 0
    grey = [np.asarray(Image.open(base / r["file"]).convert("L"), dtype=np.float64).mean() for r in rows]
    assert h[0]["scores"]["rewards:ink"] == pytest.approx(np.mean(grey))  # INK: the mean grey level
    grid = pixels(out / h[1]["grid"])
    assert grid.shape == (2 * 32, 2 * 32, 3)  # a row per prompt, a column per seed
    report = (out / "report.html").read_text()
    assert (
        'src="validation/grid-step-000000.png"' in report
        and 'src="validation/grid-step-000002.png"' in report
    )
    assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', report)
    card = (out / "final" / "README.md").read_text()
    assert "| rewards:ink |" in card and "![validation grid](validation-grid.png)" in card
    assert np.array_equal(pixels(out / "final" / "validation-grid.png"), grid)


def test_the_model_card_names_the_runs_real_values(tmp_path, tiny_pipeline_dir, pairs_parquet):
    over = {"model.lora_rank": 4, "model.lora_alpha": 8, "loss.beta": 123.0, "train.learning_rate": 0.002,
            "train.max_steps": 3}  # fmt: skip
    out = run_training(tmp_path / "run", tiny_pipeline_dir, pairs_parquet, **over)
    card = (out / "final" / "README.md").read_text()
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "license: other" in head and "library_name: diffusers" in head and "- lora" in head
    assert "base_model" not in head  # a local folder is no hub id
    assert f"`{tiny_pipeline_dir}`" in body and f"`{pairs_parquet}`" in body
    assert "| loss.beta | 123.0 |" in body and "| learning rate | 0.002 |" in body
    assert "| LoRA rank | 4 |" in body and "| LoRA alpha | 8.0 |" in body and "for 3 steps" in body
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = sum(r["implicit_acc"] for r in rows) / len(rows)
    assert f"| implicit_acc | {acc:.4g} |" in body
    assert f"| beta_eff | {123.0:.4g} |" in body  # lambda = 1
    assert "No validation during training" in body


def test_the_tensorboard_event_file_holds_the_grids(tmp_path, tiny_pipeline_dir, pairs_parquet, prompts):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = validated(prompts, **{"train.report_to": "tensorboard", "validation.held_out": "rewards:ink"})
    out = run_training(tmp_path / "run", tiny_pipeline_dir, pairs_parquet, **over)
    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0})
    acc.Reload()
    assert "validation/grid" in acc.Tags()["images"]
    grids = acc.Images("validation/grid")
    assert [g.step for g in grids] == [0, 2] and (grids[0].width, grids[0].height) == (64, 64)
    assert {"validation/held_out", "validation/drift", "implicit_acc"} <= set(acc.Tags()["scalars"])


class Tracker:
    def __init__(self, name: str) -> None:
        self.name, self.calls = name, []

    def log_images(self, values, step=None, **kw):
        self.calls.append((values, step, kw))


def test_the_grid_reaches_trackers_through_accelerates_tracker_api():
    from xdpo.rollout.validation import ImageValidation

    v = ImageValidation.__new__(ImageValidation)  # only log_grid: no pipeline needed
    tb, wandb = Tracker("tensorboard"), Tracker("wandb")
    v.acc = type("Acc", (), {"trackers": [tb, wandb]})()
    grid = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3))
    v.log_grid(7, grid)
    (values, step, kw), = tb.calls  # fmt: skip
    assert step == 7 and kw == {"dataformats": "NHWC"}
    assert np.array_equal(values["validation/grid"], np.asarray(grid)[None])
    (values, step, kw), = wandb.calls  # fmt: skip
    assert step == 7 and values == {"validation/grid": [grid]}


def test_watch_finds_the_best_and_the_stop():
    assert watch([], 2) == (False, False)
    assert watch([1.0], 2) == (True, False)  # the first is the best
    assert watch([1.0, 2.0], 2) == (True, False)
    assert watch([1.0, 2.0, 1.5], 2) == (False, False)
    assert watch([1.0, 2.0, 1.5, 1.9], 2) == (False, True)  # two below the best in a row
    assert watch([1.0, 2.0, 1.5, 2.0], 2) == (False, True)  # equal is not better
    assert watch([1.0, 2.0, 1.5, 1.9], 0) == (False, False)  # stop_on=0: never


def test_stop_on_stops_the_run_and_keeps_the_best(
    tmp_path, tiny_pipeline_dir, pairs_parquet, prompts, capsys
):
    from xdpo.config import load_config
    from xdpo.rollout.validation import ImageValidation
    from xdpo.train.recipe import train

    values = iter([3.0, 4.0, 2.0, 1.0, 5.0, 6.0, 7.0])

    def falling(images, prompts):
        return np.full(len(images), next(values))

    def factory(*args):
        return ImageValidation(*args, scorers={"held": falling})

    over = validated(prompts, **{"validation.every": 1, "validation.held_out": "held", "validation.stop_on": 2,
                                 "train.max_steps": 6})  # fmt: skip
    from conftest import train_overrides

    out = train(load_config(None, train_overrides(tmp_path / "run", tiny_pipeline_dir, pairs_parquet, **over)),
                validators=factory)  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3  # validations 0 (3.0), 1 (4.0, best), 2 (2.0), 3 (1.0): stop
    assert [r["held_out"] for r in history(out)] == [3.0, 4.0, 2.0, 1.0]
    assert json.loads((out / "best" / "xdpo.json").read_text())["step"] == 1
    assert (out / "best" / "pytorch_lora_weights.safetensors").is_file() and (out / "final").is_dir()
    assert json.loads((out / "final" / "xdpo.json").read_text())["step"] == 3
    assert "validation.stop_on" in capsys.readouterr().out


def test_resume_keeps_the_history_and_the_drift(tmp_path, tiny_pipeline_dir, pairs_parquet, prompts):
    over = validated(prompts)
    out = run_training(tmp_path / "run", tiny_pipeline_dir, pairs_parquet, **over)
    first = history(out)
    run_training(tmp_path / "run", tiny_pipeline_dir, pairs_parquet,
                 **{**over, "train.max_steps": 4, "train.resume_from": "latest"})  # fmt: skip
    h = history(out)
    assert [r["step"] for r in h] == [0, 2, 4] and h[:2] == first
    assert h[2]["drift"] > 0  # against the step-0 images read back from disk


def test_validation_rules():
    base = ["model.pretrained=x", "data.path=x"]
    with pytest.raises(ConfigError, match="validation.stop_on.*needs validation.held_out"):
        load_config(None, [*base, "validation.prompts=digits", "validation.stop_on=2"])
    with pytest.raises(ConfigError, match="validation.held_out.*needs validation.prompts"):
        load_config(None, [*base, "validation.held_out=pickscore"])
    with pytest.raises(ConfigError, match="validation.prompts.*data.cache"):
        load_config(None, [*base, "validation.prompts=digits", "data.cache=/c"])


@pytest.mark.slow
def test_two_processes_validate_once_and_agree(tmp_path, tiny_pipeline_dir, pairs_parquet, prompts):
    """Sampling and scoring on the main process, the outcome broadcast: both processes keep best/ and finish."""
    import os

    from conftest import torchrun, train_overrides

    over = validated(prompts, **{"validation.held_out": "rewards:ink", "validation.stop_on": 5})
    env = {"PYTHONPATH": os.pathsep.join([str(prompts.parent), os.environ.get("PYTHONPATH", "")])}
    torchrun("train", *train_overrides(tmp_path / "run", tiny_pipeline_dir, pairs_parquet, **over), env=env)
    out = tmp_path / "run"
    assert [r["step"] for r in history(out)] == [0, 2]
    assert len(list((out / "validation" / "step-000002").glob("*.png"))) == 4
    assert (out / "best" / "xdpo.json").is_file() and (out / "final" / "README.md").is_file()
