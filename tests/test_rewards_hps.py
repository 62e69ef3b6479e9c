"""HPSv2 on a tiny open_clip model saved in the HPS checkpoint format ({"state_dict": open_clip keys}).

The reference is open_clip's own model code: from the real package where `import open_clip` works
(it needs torchvision), else from its `open_clip.model` module alone, imported with a stand-in for
the one torchvision symbol it names at import (`torchvision.ops.misc.FrozenBatchNorm2d`, used only
to freeze batch norms) — PyPI's torchvision does not import beside the CPU torch used here. The
score of the transformers port (`--hpsv2-backend transformers`) must equal the cosine of open_clip's
`encode_image`/`encode_text` on the same weights. The open_clip backend itself (the default) needs
the real package: that test is skipped here and runs where `pip install "xdpo[hpsv2]"` works.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from xdpo.evaluate import hps
from xdpo.evaluate.loading import WeightsError
from xdpo.evaluate.scorers import load_scorer

PROMPTS = ["a red cube on a table", "a photo of a cat", "an astronaut riding a horse"]
TINY = {  # open_clip model config: 2-layer towers, 4 heads each, 32 px images, the real vocabulary
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def _open_clip_entries() -> dict[str, types.ModuleType]:
    names = [k for k in sys.modules if k.split(".")[0] in ("open_clip", "torchvision")]
    return {k: sys.modules[k] for k in names}


def open_clip_model_module() -> tuple[types.ModuleType, bool]:
    """(open_clip.model, whether the real package imported); sys.modules is left as it was."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip(
            "open_clip_torch is not installed (pip install --no-deps open_clip_torch gives its model code)"
        )
    before = _open_clip_entries()
    try:
        return importlib.import_module("open_clip").model, True
    except Exception:
        pass
    import transformers.modeling_outputs  # noqa: F401 - imported before the stand-in, which it would probe

    location = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    package = types.ModuleType("open_clip")
    package.__path__ = [location]
    try:
        for name in [k for k in sys.modules if k.split(".")[0] in ("open_clip", "torchvision")]:
            del sys.modules[name]
        sys.modules |= {
            "torchvision": types.ModuleType("torchvision"),
            "torchvision.ops": types.ModuleType("x"),
        }
        sys.modules |= {"torchvision.ops.misc": misc, "open_clip": package}
        return importlib.import_module("open_clip.model"), False
    finally:
        for name in [k for k in sys.modules if k.split(".")[0] in ("open_clip", "torchvision")]:
            del sys.modules[name]
        sys.modules.update(before)


@pytest.fixture(scope="module")
def hps_checkpoint(tmp_path_factory):
    """(path of HPS_v2_compressed.pt-format file, the open_clip model, real open_clip?)."""
    model_module, real = open_clip_model_module()
    torch.manual_seed(0)
    model = model_module.CLIP(
        embed_dim=TINY["embed_dim"],
        vision_cfg=model_module.CLIPVisionCfg(**TINY["vision_cfg"]),
        text_cfg=model_module.CLIPTextCfg(**TINY["text_cfg"]),
    ).eval()
    with torch.no_grad():  # move every weight off its init (layer norms at 1/0, zero biases)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2_compressed.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, path)
    return path, model, real


def reference_hps(model, tokenizer_dir, images, prompts) -> np.ndarray:
    """cos(encode_image, encode_text) of the open_clip model: hand-normalised 32 px pixels, 0-padded ids."""
    from transformers import CLIPTokenizer

    mean = np.array(hps.OPENAI_MEAN).reshape(3, 1, 1)
    std = np.array(hps.OPENAI_STD).reshape(3, 1, 1)
    pixels = np.stack(
        [(np.asarray(im, dtype=np.float64).transpose(2, 0, 1) / 255 - mean) / std for im in images]
    )
    ids = CLIPTokenizer.from_pretrained(tokenizer_dir)(prompts)["input_ids"]
    text = torch.zeros(len(prompts), 77, dtype=torch.long)  # open_clip's tokenizer pads with 0 to 77
    for i, row in enumerate(ids):
        text[i, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        img = model.encode_image(torch.tensor(pixels, dtype=torch.float32), normalize=True)
        txt = model.encode_text(text, normalize=True)
    return (img * txt).sum(-1).double().numpy()


def images32() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in PROMPTS]


def test_transformers_port_equals_open_clip(hps_checkpoint, clip_tokenizer_dir, monkeypatch):
    path, model, real = hps_checkpoint
    monkeypatch.setitem(hps.HEADS, "ViT-H-14", (4, 4))  # the tiny model's head counts
    scorer = load_scorer(
        "hpsv2", weights=str(path), backend="transformers", tokenizer=str(clip_tokenizer_dir)
    )
    images = images32()
    expected = reference_hps(model, clip_tokenizer_dir, images, PROMPTS)
    np.testing.assert_allclose(scorer(images, PROMPTS), expected, rtol=1e-4, atol=1e-5)
    assert np.ptp(expected) > 1e-3, "scores should differ between pairs"
    assert (
        scorer.name == "hpsv2.0" and "HPS v2.0" in scorer.details and "backend transformers" in scorer.details
    )
    assert "not comparable" in scorer.details
    v21 = load_scorer("hpsv2.1", weights=str(path), backend="transformers", tokenizer=str(clip_tokenizer_dir))
    assert v21.name == "hpsv2.1" and "HPS v2.1" in v21.details
    print(f"reference: {'the open_clip package' if real else 'open_clip.model imported without torchvision'}")


def test_bare_half_precision_ddp_state_dict_and_errors(
    hps_checkpoint, clip_tokenizer_dir, tmp_path, monkeypatch
):
    path, model, _ = hps_checkpoint
    monkeypatch.setitem(hps.HEADS, "ViT-H-14", (4, 4))
    # A bare state dict with the DDP "module." prefix, in fp16, scores as the model rounded to fp16.
    state = {f"module.{k}": v.half() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "bare.pt")
    scorer = load_scorer(
        "hpsv2", weights=str(tmp_path / "bare.pt"), backend="transformers", tokenizer=str(clip_tokenizer_dir)
    )
    expected = reference_hps(model, clip_tokenizer_dir, images32(), PROMPTS)
    np.testing.assert_allclose(scorer(images32(), PROMPTS), expected, atol=5e-3)
    torch.save(state | {"module.visual.extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(WeightsError, match=r"keys do not map: \['visual.extra.weight'\]"):
        load_scorer("hpsv2.1", weights=str(tmp_path / "extra.pt"), backend="transformers", tokenizer="x/y")
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match=r"other.pt: not an open_clip CLIP state dict"):
        load_scorer("hpsv2.1", weights=str(tmp_path / "other.pt"), backend="transformers")
    with pytest.raises(
        WeightsError, match=r"HPS_v2_compressed.pt from the hub repo xswu/HPSv2 .*--weights hpsv2.0=PATH"
    ):
        load_scorer("hpsv2", backend="transformers")  # offline: the default is the hub file


def test_text_cleaning_as_open_clip():
    assert hps.open_clip_clean("  a &amp;lt;b&amp;gt;\tcat \n ") == "a <b> cat"


def test_preprocessing_resizes_the_longest_side_and_pads_centred():
    mean = np.array(hps.OPENAI_MEAN).reshape(3, 1, 1)
    std = np.array(hps.OPENAI_STD).reshape(3, 1, 1)
    same = images32()[0]
    x = hps.hps_preprocess([same], 32)[0].double().numpy()
    np.testing.assert_allclose(
        x, (np.asarray(same, dtype=np.float64).transpose(2, 0, 1) / 255 - mean) / std, atol=1e-6
    )
    wide = Image.new("RGB", (64, 32), (255, 128, 0))  # -> 32 x 16, then 8 rows of zeros above and below
    x = hps.hps_preprocess([wide], 32)[0].double().numpy()
    pad = -mean / std
    np.testing.assert_allclose(x[:, :8], np.broadcast_to(pad, (3, 8, 32)), atol=1e-6)
    np.testing.assert_allclose(x[:, 24:], np.broadcast_to(pad, (3, 8, 32)), atol=1e-6)
    colour = (np.array([255, 128, 0]).reshape(3, 1, 1) / 255 - mean) / std
    np.testing.assert_allclose(x[:, 8:24], np.broadcast_to(colour, (3, 16, 32)), atol=1e-4)


def test_open_clip_backend_equals_the_port(hps_checkpoint, clip_tokenizer_dir, tmp_path):
    """The default backend, open_clip's own model and tokenizer; runs where open_clip imports."""
    path, _, real = hps_checkpoint
    if not real:
        pytest.skip("open_clip does not import here (its torchvision does not import beside this CPU torch)")
    import open_clip

    (tmp_path / "xdpo-tiny-hps.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "xdpo-tiny-hps.json")
    images = images32() + images32()[:1]
    prompts = [*PROMPTS, "Café &amp; CAPS   spaces"]  # open_clip's text cleaning, reproduced by the port
    kw = {"weights": str(path), "arch": "xdpo-tiny-hps"}
    official = hps.hps_scorer("v2.0", backend="open_clip", **kw)
    port = hps.hps_scorer(
        "v2.0", backend="transformers", heads=(4, 4), tokenizer=str(clip_tokenizer_dir), **kw
    )
    np.testing.assert_allclose(official(images, prompts), port(images, prompts), rtol=1e-4, atol=1e-5)
    assert "backend open_clip" in official.details
