"""`xdpo export`: each LoRA format loads back in diffusers with the same outputs, merged weights, the model
card, and the hub's one line offline."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xdpo.cli import main
from xdpo.config import dump_yaml, load_config
from xdpo.errors import ConfigError


def lora_run(tmp_path, pipe_dir, name="run", step=7):
    """A LoRA run folder as `xdpo train` leaves it (config.yaml, final/ written by `save_final`), with
    random LoRA weights large enough to change the images, and lora_alpha = 2 x rank."""
    from peft.tuners.lora import LoraLayer

    from xdpo.models.load import add_lora, load_components
    from xdpo.train.checkpoint import save_final

    run = tmp_path / name
    cfg = load_config(None, [f"output_dir={run}", f"model.pretrained={pipe_dir}", "data.path=pairs.parquet",
                             "model.lora_rank=4", "model.lora_alpha=8", "loss.beta=321"])  # fmt: skip
    comps = load_components(cfg.model, cfg.family)
    add_lora(comps.denoiser, cfg.model)
    g = torch.Generator().manual_seed(0)
    for module in comps.denoiser.modules():
        if isinstance(module, LoraLayer):
            w = module.lora_B["default"].weight
            w.data = torch.randn(w.shape, generator=g) * 0.2
    run.mkdir()
    dump_yaml(cfg, run / "config.yaml")
    acc = SimpleNamespace(distributed_type=SimpleNamespace(name="NO"), is_main_process=True,
                          unwrap_model=lambda m: m)  # fmt: skip
    save_final(acc, comps.denoiser, cfg, comps, run / "final", step)
    return run


def images(pipe):
    gen = torch.Generator().manual_seed(0)
    return pipe("a red square", num_inference_steps=2, generator=gen, output_type="np").images


def load_base(pipe_dir):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_the_kohya_file_loads_in_diffusers_as_the_peft_file_does(
    family, tmp_path, request, tiny_pipeline_dir
):
    pipe_dir = {"sd": tiny_pipeline_dir}.get(family) or request.getfixturevalue(
        {"sdxl": "tiny_sdxl_pipeline_dir", "flux": "tiny_flux_pipeline_dir"}[family]
    )
    from xdpo.export.cli import export

    run = lora_run(tmp_path, pipe_dir)
    out = export(run, formats=("diffusers", "kohya"), say=lambda s: None)
    from safetensors.torch import load_file

    kohya = load_file(out / "run_kohya.safetensors")
    prefix = "lora_transformer_" if family == "flux" else "lora_unet_"
    assert kohya and all(k.startswith(prefix) for k in kohya)
    alphas = [v for k, v in kohya.items() if k.endswith(".alpha")]
    assert alphas and all(float(a) == 8.0 for a in alphas)  # scale 8 / 4 x rank 4
    base = images(load_base(pipe_dir))
    with_peft, with_kohya = load_base(pipe_dir), load_base(pipe_dir)
    with_peft.load_lora_weights(out)
    with_kohya.load_lora_weights(out, weight_name="run_kohya.safetensors")
    a, b = images(with_peft), images(with_kohya)
    assert np.abs(a - base).max() > 1e-3  # the LoRA changes the images
    assert np.abs(a - b).max() <= 1e-5


def test_merged_weights_give_the_loras_images(tmp_path, tiny_pipeline_dir):
    from xdpo.export.cli import export

    run = lora_run(tmp_path, tiny_pipeline_dir)
    out = export(run, formats=("merged",), say=lambda s: None)
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    with_lora = load_base(tiny_pipeline_dir)
    with_lora.load_lora_weights(run / "final")
    want, base = images(with_lora), images(load_base(tiny_pipeline_dir))
    merged = images(load_base(out / "merged"))
    assert np.abs(want - base).max() > 1e-3 and np.abs(merged - want).max() <= 1e-4


def test_the_export_card_names_the_runs_values_and_license(tmp_path, tiny_pipeline_dir, capsys):
    run = lora_run(tmp_path, tiny_pipeline_dir, step=7)
    assert main(["export", str(run), "--formats", "diffusers,kohya", "--license", "openrail++"]) == 0
    card = (run / "export" / "README.md").read_text()
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "license: openrail++" in head and "- lora" in head
    assert "for 7 steps" in body and "| loss.beta | 321.0 |" in body and "| LoRA alpha | 8.0 |" in body
    assert "`run_kohya.safetensors`: kohya naming" in body and "`pytorch_lora_weights.safetensors`" in body
    final_card = (run / "final" / "README.md").read_text()  # the one every run writes
    assert "license: other" in final_card and "for 7 steps" in final_card
    assert f"wrote {run / 'export' / 'README.md'}" in capsys.readouterr().out


def test_push_to_hub_offline_is_one_line(tmp_path, tiny_pipeline_dir, capsys):
    run = lora_run(tmp_path, tiny_pipeline_dir)
    capsys.readouterr()  # the set-up's loading bars
    assert main(["export", str(run), "--formats", "diffusers", "--push-to-hub", "me/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--push-to-hub me/model: the hub is offline here (HF_HUB_OFFLINE=1)" in err[0]
    assert f"hf upload me/model {run / 'export'}" in err[0]
    assert (run / "export" / "pytorch_lora_weights.safetensors").is_file()  # the export stays


def test_push_to_hub_errors_are_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from xdpo.errors import XdpoError
    from xdpo.export.hub import push_to_hub

    def refuse(self, *a, **kw):
        raise ConnectionError("cannot reach the hub\nsecond line")

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    with pytest.raises(
        XdpoError, match=r"^--push-to-hub me/m: ConnectionError: cannot reach the hub; the export"
    ) as e:
        push_to_hub(tmp_path, "me/m")
    assert "\n" not in str(e.value)


def test_export_refuses_what_it_cannot_convert(tmp_path):
    from xdpo.export.cli import export, locate
    from xdpo.export.lora import to_kohya

    with pytest.raises(ConfigError, match="no kohya naming for sd3"):
        to_kohya({}, "sd3", "transformer", 1.0)
    with pytest.raises(ConfigError, match="neither a run folder"):
        locate(tmp_path)
    with pytest.raises(ConfigError, match="--formats: unknown 'ckpt'"):
        export(tmp_path, formats=("ckpt",))
