"""Prompt/seed parsing, `sample_images` on a tiny pipeline, and `xdpo sample` -> `xdpo evaluate`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xdpo.cli import main
from xdpo.errors import ConfigError, DataError
from xdpo.evaluate.pipeline import resolve_lora
from xdpo.evaluate.prompts import parse_seeds, resolve_prompts
from xdpo.evaluate.sample import read_manifest, sample_images
from xdpo.evaluate.scorers import SCORERS, FunctionScorer

os.environ["HF_HUB_OFFLINE"] = "1"

# --- prompts and seeds -----------------------------------------------------------------------


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert resolve_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.tsv").write_text("id\tprompt\n1\ta cat\n2\ta dog, sitting\n")
    assert resolve_prompts(str(tmp_path / "p.tsv")) == ["a cat", "a dog, sitting"]
    (tmp_path / "p.csv").write_text('caption,x\n"a cat, sitting",1\na dog,2\n')
    assert resolve_prompts(tmp_path / "p.csv") == ["a cat, sitting", "a dog"]
    (tmp_path / "a.json").write_text(json.dumps(["a cat", {"caption": "a dog"}]))
    assert resolve_prompts(tmp_path / "a.json") == ["a cat", "a dog"]
    (tmp_path / "b.json").write_text(json.dumps({"prompts": [{"prompt": "a cat"}]}))
    assert resolve_prompts(tmp_path / "b.json") == ["a cat"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n"a dog"\n')
    assert resolve_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    pq.write_table(pa.table({"caption": ["a cat", "a dog"]}), tmp_path / "p.parquet")
    assert resolve_prompts(tmp_path / "p.parquet") == ["a cat", "a dog"]
    assert resolve_prompts(["a cat", " "]) == ["a cat"]


def test_prompt_errors(tmp_path):
    (tmp_path / "p.tsv").write_text("text\na cat\n")
    with pytest.raises(DataError, match=r"p.tsv: no 'prompt' or 'caption' column \(columns: text\)"):
        resolve_prompts(tmp_path / "p.tsv")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{oops\n')
    with pytest.raises(DataError, match=r"p.jsonl: line 2: invalid JSON"):
        resolve_prompts(tmp_path / "p.jsonl")
    (tmp_path / "p.json").write_text('[{"text": "a cat"}]')
    with pytest.raises(DataError, match=r"p.json: item 0: expected a string or an object"):
        resolve_prompts(tmp_path / "p.json")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no prompts"):
        resolve_prompts(tmp_path / "empty.txt")
    with pytest.raises(ConfigError, match=r"neither a file nor a named set \(available: .*digits"):
        resolve_prompts("no-such-set")


def test_named_digits_prompts():
    prompts = resolve_prompts("digits")
    assert len(prompts) == len(set(prompts)) >= 10
    assert all(isinstance(p, str) and p for p in prompts)


@pytest.mark.parametrize(
    ("spec", "seeds"),
    [("0,1,2", [0, 1, 2]), ("0-4", [0, 1, 2, 3, 4]), ("n:3", [0, 1, 2]), ("0-2, 10", [0, 1, 2, 10]),
     ("7", [7]), ("1,1,0", [1, 0]), (5, [5]), ([3, 4], [3, 4])],
)  # fmt: skip
def test_parse_seeds(spec, seeds):
    assert parse_seeds(spec) == seeds


@pytest.mark.parametrize("spec", ["", "a", "4-2", "n:0", "1;2", "-1", "0-"])
def test_parse_seeds_errors(spec):
    with pytest.raises(ConfigError, match="seeds"):
        parse_seeds(spec)


# --- sampling on a tiny pipeline -------------------------------------------------------------

PROMPTS = ["a handwritten digit seven", "the number 2"]


def pixels(folder: Path, i: int) -> np.ndarray:
    return np.asarray(Image.open(folder / "images" / f"{i:05d}.png"), dtype=np.int16)


def test_sample_images_is_reproducible_across_batch_sizes(tiny_pipeline_dir, tmp_path):
    kw = {"out_dir": tmp_path / "b1", "steps": 2, "guidance": 5.0, "scheduler": "ddpm", "progress": False}
    b1 = sample_images(tiny_pipeline_dir, PROMPTS, "0-1", batch_size=1, **kw)
    b3 = sample_images(
        tiny_pipeline_dir, PROMPTS, [0, 1], batch_size=3, **(kw | {"out_dir": tmp_path / "b3"})
    )
    rows = read_manifest(b3)
    assert [(r["prompt"], r["seed"]) for r in rows] == [(p, s) for p in PROMPTS for s in (0, 1)]
    assert rows[3] == {
        "index": 3,
        "prompt": "the number 2",
        "seed": 1,
        "file": "images/00003.png",
        "model": str(tiny_pipeline_dir),
        "lora": None,
        "steps": 2,
        "guidance": 5.0,
        "scheduler": "ddpm",
        "scheduler_class": "DDPMScheduler",
        "height": 32,
        "width": 32,
    }
    assert sorted(p.name for p in (b3 / "images").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    for i in range(4):
        a, b = pixels(b1, i), pixels(b3, i)
        assert a.shape == (32, 32, 3)
        # Same noise; batched CPU kernels may round differently by at most a grey level.
        assert np.abs(a - b).max() <= 1 and np.mean(a != b) < 0.05
    assert np.abs(pixels(b1, 0) - pixels(b1, 1)).mean() > 5  # another seed, another image
    again = sample_images(
        tiny_pipeline_dir, PROMPTS, [0, 1], batch_size=3, **(kw | {"out_dir": tmp_path / "b3b"})
    )
    assert all(np.array_equal(pixels(b3, i), pixels(again, i)) for i in range(4))


def make_lora(pipe_dir: Path, run_dir: Path) -> Path:
    """A random non-zero LoRA saved as a training run does: run_dir/final/pytorch_lora_weights.safetensors."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(pipe_dir, subfolder="unet")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(run_dir / "final", unet_lora_layers=layers)
    return run_dir


def test_lora_and_cli_end_to_end(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    run = make_lora(tiny_pipeline_dir, tmp_path / "run")
    assert resolve_lora(run) == (run / "final", None)
    weights = run / "final" / "pytorch_lora_weights.safetensors"
    assert resolve_lora(weights) == (run / "final", weights.name)
    with pytest.raises(ConfigError, match="no pytorch_lora_weights.safetensors"):
        resolve_lora(tmp_path)

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    common = ["--model", str(tiny_pipeline_dir), "--prompts", str(tmp_path / "prompts.txt"), "--seeds", "n:2"]
    common += ["--steps", "2", "--guidance", "3", "--batch-size", "4"]
    assert main(["sample", *common, "--out", str(tmp_path / "base")]) == 0
    assert main(["sample", *common, "--lora", str(run), "--out", str(tmp_path / "tuned")]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    tuned = read_manifest(tmp_path / "tuned")
    assert tuned[0]["lora"] == str(run) and tuned[0]["scheduler"] == "ddim"
    assert np.abs(pixels(tmp_path / "base", 0) - pixels(tmp_path / "tuned", 0)).mean() > 1  # LoRA active

    def mean_grey(images, prompts):
        return np.array([np.asarray(im, dtype=float).mean() for im in images])

    monkeypatch.setitem(SCORERS, "grey", lambda device=None: FunctionScorer("grey", mean_grey, "test"))
    names = "grey,digits-reward,digits-alignment"
    args = ["evaluate", "--images", str(tmp_path / "tuned"), "--baseline", str(tmp_path / "base")]
    assert main([*args, "--scorers", names, "--out", str(tmp_path / "report")]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["settings"]["lora"] == str(run)
    for name in names.split(","):
        assert summary["scorers"][name]["vs_baseline"]["n_matched"] == 4
    expected = np.mean([mean_grey([Image.open(tmp_path / "tuned" / r["file"])], [""])[0] for r in tuned])
    assert summary["scorers"]["grey"]["mean"] == pytest.approx(expected)
    assert "| grey |" in (tmp_path / "report" / "summary.md").read_text()

    # Sampling again into a folder removes its old images and score cache.
    assert (tmp_path / "base" / "scores.parquet").is_file()
    sample_images(tiny_pipeline_dir, PROMPTS[:1], [0], out_dir=tmp_path / "base", steps=1, progress=False)
    assert len(read_manifest(tmp_path / "base")) == 1
    assert sorted(p.name for p in (tmp_path / "base" / "images").iterdir()) == ["00000.png"]
    assert not (tmp_path / "base" / "scores.parquet").exists()


def test_sampling_errors(tiny_pipeline_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="is not a diffusers pipeline folder"):
        sample_images(tmp_path, ["x"], [0], out_dir=tmp_path / "o")
    with pytest.raises(ConfigError, match="scheduler: 'plms' is not one of"):
        sample_images(tiny_pipeline_dir, ["x"], [0], out_dir=tmp_path / "o", scheduler="plms")
    with pytest.raises(ConfigError, match="fp16 sampling needs a GPU"):
        sample_images(tiny_pipeline_dir, ["x"], [0], out_dir=tmp_path / "o", device="cpu", dtype="fp16")
    with pytest.raises(ConfigError, match=r"height and width \(33, None\) must be positive multiples of 2"):
        sample_images(tiny_pipeline_dir, ["x"], [0], out_dir=tmp_path / "o", height=33)
    code = main(["sample", "--model", str(tmp_path), "--prompts", "nope", "--out", str(tmp_path / "o")])
    assert code == 2 and "neither a file nor a named set" in capsys.readouterr().err


def test_named_model_resolves_to_a_pipeline_folder(tiny_pipeline_dir, tmp_path):
    from xdpo.apps.digits import DIGITS_SAMPLING, base_model_path
    from xdpo.evaluate import pipeline as sample

    assert sample.resolve_model("digits") == base_model_path()  # through models.load.resolve_pretrained
    assert sample.resolve_model(str(tiny_pipeline_dir)) == tiny_pipeline_dir
    assert sample.sampling_defaults("digits") == DIGITS_SAMPLING
    assert sample.sampling_defaults(tiny_pipeline_dir) == sample.PAPER_SAMPLING

    out = tmp_path / "digits"
    assert (
        main(["sample", "--model", "digits", "--prompts", "digits", "--limit", "1", "--out", str(out)]) == 0
    )
    row = read_manifest(out)[0]  # the digits world's sampling defaults, not the SD papers'
    assert {k: row[k] for k in DIGITS_SAMPLING} == DIGITS_SAMPLING
    assert row["model"] == str(base_model_path())


def test_each_family_samples_with_its_own_scheduler_and_another_vae(
    tmp_path, tiny_pipeline_dir, tiny_sdxl_pipeline_dir
):
    from xdpo.evaluate import pipeline as sample

    assert sample.sampling_defaults(tiny_pipeline_dir)["scheduler"] == "ddim"  # SD 1.x: the papers'
    assert sample.sampling_defaults(tiny_sdxl_pipeline_dir)["scheduler"] == "default"  # SDXL: its Euler
    out = tmp_path / "xl"
    args = ["sample", "--model", str(tiny_sdxl_pipeline_dir), "--prompts", "digits", "--limit", "1"]
    assert main([*args, "--steps", "2", "--vae", str(tiny_sdxl_pipeline_dir / "vae"), "--out", str(out)]) == 0
    row = read_manifest(out)[0]
    assert row["scheduler_class"] == "EulerDiscreteScheduler" and row["vae"] == str(
        tiny_sdxl_pipeline_dir / "vae"
    )


def test_missing_paths_say_so_before_anything_loads(tmp_path, tiny_pipeline_dir, monkeypatch):
    import diffusers

    from xdpo.evaluate.pipeline import load_pipeline

    def never(*a, **k):
        raise AssertionError("loaded a pipeline before checking the paths")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", never)
    with pytest.raises(ConfigError, match="lora: .* does not exist"):
        load_pipeline(tiny_pipeline_dir, lora=tmp_path / "no-run")
    with pytest.raises(ConfigError, match="model: .* does not exist"):
        load_pipeline(tmp_path / "no-model")
    with pytest.raises(ConfigError, match="vae: .* does not exist"):
        load_pipeline(tiny_pipeline_dir, vae=tmp_path / "no-vae")
