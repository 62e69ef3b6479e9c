"""PickScore, CLIP score, the LAION aesthetic predictor and ImageReward on tiny random-weight models.

The models are built in the real checkpoints' formats (a transformers CLIPModel folder + a
CLIPProcessor folder; the aesthetic MLP as a `layers.N.weight` state dict in .pth and
.safetensors), loaded through the scorers' real loading code (`--weights` paths), and each score is
compared with an independent computation of the scorer's formula: images preprocessed by hand
(PIL bicubic resize + numpy normalisation), the CLIP towers called directly.
"""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from xdpo.cli import main
from xdpo.errors import ConfigError
from xdpo.evaluate.rewards import MissingExtraError, WeightsError
from xdpo.evaluate.scorers import load_scorer, load_scorers, parse_weights

SIZE = 32
PROMPTS = ["a red cube on a table", "a photo of a cat", "an astronaut riding a horse"]
MLP_SHAPES = [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]  # sac+logos+ava1-l14-linearMSE.pth


def texture(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [texture(i) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory, clip_tokenizer_dir):
    """(model dir, processor dir): a tiny CLIPModel (projection 768 like ViT-L/14) + CLIPProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": SIZE,
            "patch_size": 8,
        },
        projection_dim=768,
        logit_scale_init_value=math.log(100.0),  # as PickScore_v1 (exp = 100)
    )
    root = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(root / "model")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    )
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "processor")
    return root / "model", root / "processor"


def reference_embeddings(model_dir, tokenizer_dir, images, prompts):
    """Independent: hand-made pixels, the CLIP towers and projections called directly, then L2-normalised."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(model_dir).eval()
    mean = np.array([0.48145466, 0.4578275, 0.40821073]).reshape(3, 1, 1)
    std = np.array([0.26862954, 0.26130258, 0.27577711]).reshape(3, 1, 1)
    pixels = [
        (
            np.asarray(im.resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float64).transpose(2, 0, 1)
            / 255
            - mean
        )
        / std
        for im in images
    ]
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        vision = model.vision_model(pixel_values=torch.tensor(np.stack(pixels), dtype=torch.float32))
        img = model.visual_projection(vision.pooler_output)
        text = model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        txt = model.text_projection(text.pooler_output)
    img, txt = img.double().numpy(), txt.double().numpy()
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return model, img, txt


def test_pickscore_is_logit_scale_exp_times_cosine(clip_dirs, clip_tokenizer_dir, images):
    model_dir, processor_dir = clip_dirs
    scorer = load_scorer("pickscore", weights=str(model_dir), processor=str(processor_dir))
    scores = scorer(images, PROMPTS)
    model, img, txt = reference_embeddings(model_dir, clip_tokenizer_dir, images, PROMPTS)
    cosine = (img * txt).sum(axis=1)
    expected = math.exp(model.logit_scale.item()) * cosine
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores / cosine, 100.0, rtol=1e-4)  # not the raw cosine
    assert scorer.name == "pickscore" and "logit_scale.exp() x cos" in scorer.details
    assert str(model_dir) in scorer.details and str(processor_dir) in scorer.details


def test_clip_score_is_the_cosine_and_names_the_model(clip_dirs, clip_tokenizer_dir, images):
    model_dir, processor_dir = clip_dirs
    scorer = load_scorer("clip", weights=str(model_dir), processor=str(processor_dir))
    _, img, txt = reference_embeddings(model_dir, clip_tokenizer_dir, images, PROMPTS)
    np.testing.assert_allclose(scorer(images, PROMPTS), (img * txt).sum(axis=1), rtol=1e-4, atol=1e-5)
    assert f"model {model_dir}" in scorer.details and "cos(image, text)" in scorer.details
    assert "not x100" in scorer.details


def mlp_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer, (out_dim, in_dim) in zip((0, 2, 4, 6, 7), MLP_SHAPES, strict=True):
        state[f"layers.{layer}.weight"] = torch.randn(out_dim, in_dim, generator=g) / math.sqrt(in_dim)
        state[f"layers.{layer}.bias"] = torch.randn(out_dim, generator=g) * 0.1
    return state


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_is_the_mlp_on_normalised_image_embeddings(
    clip_dirs_with_processor, clip_tokenizer_dir, images, tmp_path, fmt
):
    from safetensors.torch import save_file

    state = mlp_state()
    path = tmp_path / f"sac+logos+ava1-l14-linearMSE.{fmt}"
    torch.save(state, path) if fmt == "pth" else save_file(state, str(path))
    model_dir = (
        clip_dirs_with_processor  # model and processor in one folder, as openai/clip-vit-large-patch14
    )
    scorer = load_scorer("aesthetic", weights=str(path), clip=str(model_dir))
    _, img, _ = reference_embeddings(model_dir, clip_tokenizer_dir, images, PROMPTS)
    x = img
    for layer in (0, 2, 4, 6, 7):  # dropout is the identity at inference
        x = (
            x @ state[f"layers.{layer}.weight"].double().numpy().T
            + state[f"layers.{layer}.bias"].double().numpy()
        )
    np.testing.assert_allclose(scorer(images, PROMPTS), x[:, 0], rtol=1e-4, atol=1e-5)
    assert scorer(images, ["", "", ""]).tolist() == pytest.approx(x[:, 0].tolist(), abs=1e-5)  # text-free
    assert "L2-normalised CLIP image embedding" in scorer.details and "sha256" in scorer.details


@pytest.fixture(scope="module")
def clip_dirs_with_processor(clip_dirs, tmp_path_factory):
    """The aesthetic scorer loads model and processor from one folder (as openai/clip-vit-large-patch14)."""
    import shutil

    model_dir, processor_dir = clip_dirs
    both = tmp_path_factory.mktemp("clip_both")
    for src in (model_dir, processor_dir):
        for f in src.iterdir():
            shutil.copy(f, both / f.name)
    return both


class NotWeights:
    """A pickled object that is not a tensor: `weights_only=True` must refuse it."""


def test_aesthetic_weights_only_and_key_errors(tmp_path, clip_dirs_with_processor):
    torch.save({"layers.0.weight": torch.zeros(1), "extra": NotWeights()}, tmp_path / "pickled.pth")
    with pytest.raises(
        WeightsError, match=r"pickled.pth: cannot read aesthetic MLP weights with weights_only=True"
    ):
        load_scorer("aesthetic", weights=str(tmp_path / "pickled.pth"), clip=str(clip_dirs_with_processor))
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match=r"other.pth: no layers.0.weight"):
        load_scorer("aesthetic", weights=str(tmp_path / "other.pth"), clip=str(clip_dirs_with_processor))
    with pytest.raises(WeightsError, match=r"--weights aesthetic: .*missing.pth is not a file"):
        load_scorer("aesthetic", weights=str(tmp_path / "missing.pth"))


def test_hub_defaults_fail_offline_with_a_hint():
    # conftest sets HF_HUB_OFFLINE=1: the defaults are hub ids, so each names the --weights escape hatch.
    with pytest.raises(
        WeightsError, match=r"pickscore: cannot load 'yuvalkirstain/PickScore_v1' .*--weights pickscore=PATH"
    ):
        load_scorer("pickscore")
    with pytest.raises(WeightsError, match=r"sac\+logos\+ava1-l14-linearMSE.pth from the hub repo camenduru/improved-aesthetic-predictor .*--weights aesthetic=PATH"):  # fmt: skip
        load_scorer("aesthetic")
    with pytest.raises(WeightsError, match=r"--weights clip: ./nope/clip not found"):
        load_scorer("clip", weights="./nope/clip")


def test_missing_extra_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # as if `image-reward` were not installed
    with pytest.raises(MissingExtraError) as e:
        load_scorer("imagereward")
    assert 'pip install "xdpo[imagereward]"' in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingExtraError, match=r'hpsv2.0 needs the `open_clip` package.*pip install "xdpo\[hpsv2\]".*torchvision.*--hpsv2-backend transformers'):  # fmt: skip
        load_scorer("hpsv2")


def test_imagereward_groups_by_prompt_and_keeps_order(monkeypatch, images):
    """The glue around the official package: one `model.score(prompt, images)` call per prompt."""
    calls = []

    class FakeModel:
        def score(self, prompt, imgs):
            calls.append((prompt, len(imgs)))
            rewards = [len(prompt) + np.asarray(im).mean() / 1000 for im in imgs]
            return rewards if len(rewards) > 1 else rewards[0]  # the package returns a float for one image

    fake = types.ModuleType("ImageReward")
    fake.load = lambda name, device=None, med_config=None: calls.append(("load", name)) or FakeModel()
    fake.__version__ = "1.5"
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    scorer = load_scorer("imagereward", device="cpu")
    prompts = ["b", "aa", "b"]
    scores = scorer(images, prompts)
    expected = [len(p) + np.asarray(im).mean() / 1000 for im, p in zip(images, prompts, strict=True)]
    np.testing.assert_allclose(scores, expected)
    assert calls == [("load", "ImageReward-v1.0"), ("b", 2), ("aa", 1)]
    assert scorer.details == "ImageReward v1.0 (THUDM/ImageReward) via image-reward 1.5"


def test_weights_options_parse_and_validate(tmp_path):
    assert parse_weights(["hpsv2=/a.pt", "hpsv2.1.tokenizer=t", "pickscore.processor=p", "clip=org/m"]) == {
        "hpsv2.0": {"weights": "/a.pt"},
        "hpsv2.1": {"tokenizer": "t"},
        "pickscore": {"processor": "p"},
        "clip": {"weights": "org/m"},
    }
    with pytest.raises(ConfigError, match=r"--weights 'pickscore': expected NAME=PATH"):
        parse_weights(["pickscore"])
    with pytest.raises(ConfigError, match=r"--weights pickscor: unknown scorer"):
        parse_weights(["pickscor=x"])
    with pytest.raises(
        ConfigError, match=r"scorer pickscore: unknown option 'procesor' \(options: weights, processor\)"
    ):
        load_scorer("pickscore", procesor="x")
    with pytest.raises(ConfigError, match=r"options \(--weights\) for clip, which is not among the scorers"):
        load_scorers("pickscore", options={"clip": {"weights": "x"}})
    code = main(["evaluate", "--images", str(tmp_path), "--scorers", "clip", "--weights", "clip"])
    assert code == 2


def test_evaluate_cli_with_local_weights(clip_dirs_with_processor, tmp_path, images, capsys):
    """`xdpo evaluate --weights pickscore=DIR --weights clip=DIR` scores a sample folder."""
    import json

    folder = tmp_path / "samples"
    (folder / "images").mkdir(parents=True)
    with (folder / "manifest.jsonl").open("w") as f:
        for i, (im, p) in enumerate(zip(images, PROMPTS, strict=True)):
            im.save(folder / f"images/{i:05d}.png")
            f.write(json.dumps({"prompt": p, "seed": 0, "file": f"images/{i:05d}.png"}) + "\n")
    d = str(clip_dirs_with_processor)
    args = ["evaluate", "--images", str(folder), "--scorers", "pickscore,clip", "--weights", f"pickscore={d}"]
    args += ["--weights", f"clip={d}", "--bootstrap", "50"]  # the folder also holds the processor
    assert main(args) == 0
    summary = json.loads((folder / "summary.json").read_text())
    direct = load_scorer("pickscore", weights=d, processor=d)(images, PROMPTS)
    assert summary["scorers"]["pickscore"]["mean"] == pytest.approx(direct.mean(), abs=1e-4)
    assert "PickScore" in summary["scorers"]["pickscore"]["details"]
    assert "| pickscore |" in capsys.readouterr().out
