"""The digits bases' component builders (`make_*`, through `xdpo.models.small.components`) build exactly the
shipped architectures: each builder's saved config equals the shipped config.json (less what training sets),
the shipped weights load into it strictly, and `from_pretrained` of the shipped folder reports no missing or
unexpected key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from xdpo.apps.digits import base as digits_base
from xdpo.apps.digits import base_model_path, flow_base_model_path
from xdpo.apps.digits import flow_base as digits_flow

VERSIONS = {"_diffusers_version", "transformers_version", "_name_or_path"}
TRAINED = {"vae": {"scaling_factor", "shift_factor"}}
"""Config keys the build sets after training: the VAE's latent normalisation (measured on the digits)."""

BASE = {
    "vae": digits_base.make_vae,
    "text_encoder": digits_base.make_text_encoder,
    "unet": digits_base.make_unet,
    "scheduler": digits_base.make_scheduler,
}
FLOW = {
    "vae": digits_base.make_vae,
    "text_encoder": digits_flow.make_text_encoder,
    "text_encoder_2": digits_flow.make_text_encoder,
    "transformer": lambda: digits_flow.make_transformer(digits_flow.FlowRecipe()),
    "scheduler": digits_flow.make_scheduler,
}
CASES = [("base", name, make) for name, make in BASE.items()]
CASES += [("flow", name, make) for name, make in FLOW.items()]


def shipped(world: str) -> Path:
    return base_model_path() if world == "base" else flow_base_model_path()


def saved_config(component, folder: Path) -> dict:
    """The config.json (or scheduler_config.json) `save_pretrained` writes for `component`."""
    if hasattr(component, "save_config"):  # diffusers models and schedulers
        component.save_config(folder)
    else:  # transformers models: "architectures" is written by save_pretrained
        component.save_pretrained(folder)
    (name,) = [f for f in folder.glob("*config.json")]
    return json.loads(name.read_text())


def comparable(config: dict, component: str) -> dict:
    return {k: v for k, v in config.items() if k not in VERSIONS | TRAINED.get(component, set())}


@pytest.mark.parametrize(("world", "component", "make"), CASES, ids=[f"{w}-{c}" for w, c, _ in CASES])
def test_builder_config_equals_the_shipped_config(tmp_path, world, component, make):
    folder = shipped(world) / component
    (config_file,) = folder.glob("*config.json")
    expected = json.loads(config_file.read_text())
    built = saved_config(make(), tmp_path)
    assert comparable(built, component) == comparable(expected, component)
    assert TRAINED.get(component, set()) <= set(built)  # the keys set after training exist in the builder's


@pytest.mark.parametrize(
    ("world", "component", "make"),
    [case for case in CASES if case[1] != "scheduler"],
    ids=[f"{w}-{c}" for w, c, _ in CASES if c != "scheduler"],
)
def test_shipped_weights_load_strictly_into_the_builder(world, component, make):
    (weights,) = (shipped(world) / component).glob("*.safetensors")
    model = make()
    result = model.load_state_dict(load_file(weights), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded, info = type(model).from_pretrained(shipped(world) / component, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(loaded) is type(model)
