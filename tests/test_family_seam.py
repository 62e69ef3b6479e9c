"""The family seam is closed: a new family is one file plus one registration, nothing else names a family.

A throwaway family (the SD family's record under another name, pipeline class and knob, written to a
file of its own) is registered and then detected, chosen by `model.family`, configured through its own
`family.*` key, trained and saved to `final/`, with no other module edited. Outside
`src/xdpo/models/families/` no source compares a value with a family's name, pipeline class or denoiser.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_training
from xdpo.config import all_keys, help_table, load_config
from xdpo.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src" / "xdpo"
FAMILIES = SRC / "models" / "families"

THROWAWAY = '''\
"""A throwaway family: the SD family's record with its own name, pipeline class and knob."""

import dataclasses

from diffusers import StableDiffusionPipeline

from xdpo.models.families import Option, sd


class ThrowawayPipeline(StableDiffusionPipeline):
    """A pipeline class diffusers does not know."""


def encode_text(comps, captions, device):
    p = comps.options.throwaway_prefix
    return sd.encode_text(comps, [f"{p} {c}" if p else c for c in captions], device)


FAMILY = dataclasses.replace(
    sd.FAMILY,
    name="throwaway",
    pipeline_class=f"{__name__}.ThrowawayPipeline",
    class_names=("ThrowawayPipeline",),
    encode_text=encode_text,
    options=(Option("throwaway_prefix", str, "", "words put before every caption", cached=True),),
)
'''


@pytest.fixture
def registry(monkeypatch):
    """The family registry, with whatever a test registers removed afterwards."""
    from xdpo.models import families

    monkeypatch.setattr(families, "_registered", {})
    return families


@pytest.fixture
def throwaway(tmp_path, monkeypatch, registry):
    """The throwaway family's module: one file, imported and registered (both undone after the test)."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "xdpo_throwaway_family.py").write_text(THROWAWAY)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "xdpo_throwaway_family", raising=False)
    module = importlib.import_module("xdpo_throwaway_family")
    registry.register_family(module.FAMILY)
    yield module
    sys.modules.pop("xdpo_throwaway_family", None)


def relabelled(tmp_path, src, class_name):
    """A pipeline folder whose model_index.json names `class_name` (components linked from `src`)."""
    out = tmp_path / class_name
    out.mkdir()
    for part in src.iterdir():
        if part.is_dir():
            (out / part.name).symlink_to(part, target_is_directory=True)
    index = json.loads((src / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    return out


def test_a_new_family_is_detected_and_configured(tmp_path, throwaway, tiny_pipeline_dir):
    from xdpo.models.families import family_names, family_of_pipeline, get_family
    from xdpo.models.load import check_pipeline, load_components

    fam = get_family("throwaway")
    base = relabelled(tmp_path, tiny_pipeline_dir, "ThrowawayPipeline")
    assert check_pipeline(str(base)) is fam  # model_index.json's _class_name
    assert check_pipeline(str(tiny_pipeline_dir)).name == "sd"  # the family it copies is untouched
    assert family_names()[-1] == "throwaway"

    # model.family accepts it; its knob is a typed, documented key of the family section
    assert "family.throwaway_prefix" in all_keys() and "family.throwaway_prefix" in help_table()
    assert "throwaway" in help_table().split("model.family", 1)[1].splitlines()[0]
    over = [f"model.pretrained={base}", "data.path=x", "model.family=throwaway"]
    cfg = load_config(None, [*over, "family.throwaway_prefix=a photo of"])
    assert cfg.model.family == "throwaway" and cfg.family.throwaway_prefix == "a photo of"
    with pytest.raises(ConfigError, match="`family.throwaway_prefix`: expected str"):
        load_config(None, [*over, "family.throwaway_prefix=[1, 2]"])
    with pytest.raises(ConfigError, match="`model.family`: expected auto .* throwaway, got 'throwawy'"):
        load_config(None, [f"model.pretrained={base}", "data.path=x", "model.family=throwawy"])

    # the knob reaches the family through the loaded components
    comps = load_components(cfg.model, cfg.family)
    assert comps.family is fam and type(comps.pipe) is throwaway.ThrowawayPipeline
    assert family_of_pipeline(comps.pipe) is fam
    cpu = torch.device("cpu")
    with_prefix = fam.encode_text(comps, ["a cat"], cpu)["encoder_hidden_states"]
    written_out = get_family("sd").encode_text(comps, ["a photo of a cat"], cpu)["encoder_hidden_states"]
    torch.testing.assert_close(with_prefix, written_out, rtol=0, atol=0)
    assert fam.cache_keys(cfg.family) == {"family.throwaway_prefix": "a photo of"}


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_a_new_family_trains_and_saves_final(tmp_path, throwaway, tiny_pipeline_dir, pairs_parquet, lora):
    from xdpo.models.load import check_pipeline

    base = relabelled(tmp_path, tiny_pipeline_dir, "ThrowawayPipeline")
    extra = {"model.family": "throwaway", "family.throwaway_prefix": "a photo of", "model.lora_rank": lora}
    out = run_training(tmp_path / "run", base, pairs_parquet, **{"train.max_steps": 2, **extra})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    info = json.loads((out / "final" / "xdpo.json").read_text())
    assert (info["family"], info["pipeline_class"]) == (
        "throwaway",
        "xdpo_throwaway_family.ThrowawayPipeline",
    )
    if lora:
        pipe = throwaway.ThrowawayPipeline.from_pretrained(base)
        pipe.load_lora_weights(out / "final")  # the LoRA key format its family declares (diffusers')
        assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    else:
        assert check_pipeline(str(out / "final")).name == "throwaway"  # final/ is a pipeline of the family
        assert type(throwaway.ThrowawayPipeline.from_pretrained(out / "final")) is throwaway.ThrowawayPipeline


def test_register_family_refuses_a_taken_name_and_a_clashing_option(registry):
    from xdpo.models.families import Option, get_family

    sd = get_family("sd")
    with pytest.raises(ConfigError, match="'sd' is already registered"):
        registry.register_family(sd)
    clash = dataclasses.replace(sd, name="other", options=(Option("guidance", int, 3, "an int guidance"),))
    with pytest.raises(ConfigError, match="option 'guidance' of other differs from flux's"):
        registry.register_family(clash)
    assert "other" not in registry.family_names()


def test_shared_options_are_one_key_and_old_keys_still_work(capsys):
    """SD3's and Flux's `max_sequence_length` are one key; `model.guidance` etc. map to `family.*` with one
    line naming the new key."""
    keys = [k for k in all_keys() if k.startswith("family.")]
    assert keys == [
        "family.text_encoder_3",
        "family.max_sequence_length",  # SD3, Flux, Qwen-Image, FLUX.2, Z-Image, Wan: one key
        "family.guidance",
        "family.embedded_guidance",
        "family.shift_steps",
    ]
    assert not {"model.text_encoder_3", "model.max_sequence_length", "model.guidance"} & set(all_keys())
    base = ["model.pretrained=m", "data.path=x"]
    old = ["model.guidance=2", "model.max_sequence_length=64", "model.text_encoder_3=false"]
    cfg = load_config(None, [*base, *old])
    assert (cfg.family.guidance, cfg.family.max_sequence_length, cfg.family.text_encoder_3) == (
        2.0,
        64,
        False,
    )
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "xdpo: config key `model.guidance` is deprecated; use `family.guidance`",
        "xdpo: config key `model.max_sequence_length` is deprecated; use `family.max_sequence_length`",
        "xdpo: config key `model.text_encoder_3` is deprecated; use `family.text_encoder_3`",
    ]
    # a later setting under either name wins, as for any key set twice
    assert load_config(None, [*base, "family.guidance=5", "model.guidance=2"]).family.guidance == 2.0
    assert load_config(None, [*base, "model.guidance=2", "family.guidance=5"]).family.guidance == 5.0
    with pytest.raises(ConfigError, match="`family.max_sequence_length`: must be >= 0, got -1"):
        load_config(None, [*base, "model.max_sequence_length=-1"])


def test_the_family_checks_the_resolution_with_its_patch():
    from xdpo.models.families import get_family

    with pytest.raises(
        ConfigError, match="`data.resolution`: 1000 px is not a multiple of 16, which flux needs"
    ):
        get_family("flux").check_resolution(1000, 8)
    get_family("sd").check_resolution(1000, 8)
    get_family("flux").check_resolution(20, 2)  # a tiny pipeline's VAE downsamples 2x

    assert get_family("flux").image_tokens(64, 32) == 32 * 16 and get_family("sd").image_tokens(3, 5) == 15
    with pytest.raises(ConfigError, match="data.resolution"):
        get_family("sd3").image_tokens(125, 125)


# ---- no family name outside the families' own package -------------------------------------------------

WORLD_NAMES = {"sd"}
"""The digits demo's and study's worlds (`sd`, `flow`) name shipped bases, not families: allowed there."""
HARNESSES = ("demo", "study", "apps")


def _strings(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [s for elt in node.elts for s in _strings(elt)]
    return []


def family_name_comparisons(source: str, names: set[str], classes: set[str]) -> list[tuple[int, str]]:
    """(line, literal) of every comparison with a family or pipeline-class name (==, !=, in, not in), and
    every `.startswith`/`.endswith` with a prefix of a family's pipeline class."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for s in (s for part in (node.left, *node.comparators) for s in _strings(part)):
                if s in names or s in classes:
                    found.append((node.lineno, s))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "endswith")
        ):
            for s in (s for arg in node.args for s in _strings(arg)):
                if s and any(c.startswith(s) or c.endswith(s) for c in classes):
                    found.append((node.lineno, s))
    return found


def test_the_name_finder_finds_comparisons():
    names, classes = {"sd3", "flux"}, {"FluxPipeline"}
    text = (
        'if fam.name == "sd3":\n    pass\nok = name in ("flux", "x")\nb = type(p).__name__.startswith("Flux")\n'
        'c = "sd3" != x\nd = {"sd3": 1}["sd3"]\ne = x == "sdxl"\nf = n.startswith("Flow")\n'
    )
    assert family_name_comparisons(text, names, classes) == [(1, "sd3"), (3, "flux"), (4, "Flux"), (5, "sd3")]


def test_no_source_outside_the_families_compares_a_family_name():
    """Family names, pipeline classes and denoiser names (`fam.denoiser == "unet"` branches on a trait the
    record should hold)."""
    from xdpo.models.families import denoiser_names, families

    names = set(families()) | set(denoiser_names())
    classes = {c for fam in families().values() for c in (*fam.class_names, fam.pipeline_class)}
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if FAMILIES in path.parents:
            continue
        harness = path.relative_to(SRC).parts[0] in HARNESSES
        allowed = names & WORLD_NAMES if harness else set()
        for line, s in family_name_comparisons(path.read_text(), names - allowed, classes):
            found.append(f"{path.relative_to(SRC.parent)}:{line}: {s!r}")
    assert not found, "family names compared outside models/families/ (ask the Family record):\n" + "\n".join(
        found
    )


def test_a_cache_written_under_the_old_key_names_still_matches():
    """Manifests from before the family section record `model.guidance` etc.: compared under the new key."""
    from xdpo.data.cache import FORMAT, check_manifest

    cfg = load_config(None, ["model.pretrained=m", "data.path=x", "data.cache=c", "family.guidance=3.5"])
    manifest = {"format": FORMAT, "depends": {"model.family": "flux", "model.guidance": 3.5}}
    check_manifest(manifest, cfg, {"model.family": "flux", "family.guidance": 3.5})
    with pytest.raises(ConfigError, match="was built for family.guidance=3.5, the config says 4.0"):
        check_manifest(manifest, cfg, {"model.family": "flux", "family.guidance": 4.0})


def test_the_help_texts_name_every_built_in_family():
    """`xdpo train --help` and `model.pretrained`'s help list the families the registry ships."""
    from xdpo.config.schema import ModelConfig
    from xdpo.models.families import BUILT_IN, get_family
    from xdpo.train.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["train"]
    pretrained = dataclasses.fields(ModelConfig)[0].metadata["help"]
    for name in BUILT_IN:
        short = get_family(name).about.split(":")[0]
        assert short in sub.description, f"xdpo train --help does not name {short}"
        assert short in pretrained, f"model.pretrained's help does not name {short}"
