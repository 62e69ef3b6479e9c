"""The study's jobs on the digits world's second task (`slant`): their names, their pairs and their reward."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from xdpo.apps.digits.data import load_digit_images
from xdpo.apps.digits.labeller import hidden_reward
from xdpo.apps.digits.tasks import slant_reward
from xdpo.apps.study.plan import Job, StudySettings


def test_a_second_task_job_has_its_own_name_and_record():
    bold = Job("sd", "main", "dpo", "digits-dpo.yaml", 30.0, 3e-5, 0, 200, 5)
    slant = Job("sd", "main", "dpo", "digits-dpo.yaml", 30.0, 3e-5, 0, 200, 5, task="slant")
    assert bold.name == "sd/main/dpo-b30-lr3e-05-s0" and slant.name == "sd-slant/main/dpo-b30-lr3e-05-s0"
    assert "task" not in bold.as_dict()  # result.json files of the first task still match their jobs
    assert slant.as_dict()["task"] == "slant"


class FakeEvaluator:
    def __init__(self, images: list) -> None:
        words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
        self.prompts = [f"a handwritten digit {w}" for w in words[: len(images)]]
        self.base_pixels = np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in images])


def test_image_stats_scores_the_jobs_task():
    from xdpo.apps.study.runner import image_stats

    grey, _ = load_digit_images()
    images = [Image.fromarray(g) for g in grey[:8]]
    ev = FakeEvaluator(images)
    slant = image_stats(ev, images, "slant")["reward"]
    bold = image_stats(ev, images)["reward"]
    np.testing.assert_allclose(slant, slant_reward(images, ev.prompts), atol=1e-5)
    np.testing.assert_allclose(bold, hidden_reward(images, ev.prompts), atol=1e-5)
    assert not np.allclose(slant, bold)


def test_pairs_per_task_are_kept_apart_and_reused(tmp_path):
    from xdpo.apps.study.run import _pairs

    s = StudySettings(tmp_path, worlds=("sd",), n_pairs=4)
    path = _pairs("sd", s, "slant")
    assert path.endswith("sd-slant.parquet")
    rec = json.loads((tmp_path / "pairs" / "sd-slant.parquet.json").read_text())
    assert rec["task"] == "slant" and rec["labeller"]["noise"] == 0.1
    assert _pairs("sd", s, "slant").endswith("(reused)")
    assert not (tmp_path / "pairs" / "sd.parquet").exists()


@pytest.mark.parametrize("task", ["tilt"])
def test_an_unknown_task_is_refused(tmp_path, task):
    from xdpo.apps.study.run import _pairs
    from xdpo.errors import DataError

    with pytest.raises(DataError, match="task 'tilt'"):
        _pairs("sd", StudySettings(tmp_path, worlds=("sd",), n_pairs=4), task)


def test_pair_sets_name_their_jobs_and_pairs():
    from xdpo.apps.study.plan import pairs_stem

    job = Job("sd", "main", "dpo", "digits-dpo.yaml", 30.0, 3e-5, 0, 200, 5, task="slant", pair_set=2)
    assert job.name == "sd-slant/main/dpo-b30-lr3e-05-s0-p2" and job.pairs_stem == "sd-slant-p2"
    assert (
        job.as_dict()["pair_set"] == 2
        and "pair_set" not in Job("sd", "main", "dpo", "x", 1, 1, 0, 1, 0).as_dict()
    )
    assert pairs_stem("flow") == "flow" and pairs_stem("flow", "bold", 1) == "flow-p1"
