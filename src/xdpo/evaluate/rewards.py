"""The field's reward models as scorers: PickScore, CLIP score, LAION aesthetic, ImageReward.

(HPSv2 lives in `hps.py`.) Each factory loads its weights once — from the hub by default, or from
a local path given as an option (`--weights NAME=PATH`, `--weights NAME.PART=PATH` on the CLI) —
and returns a `FunctionScorer` that scores a batch of (image, prompt) pairs, on the GPU when there
is one (fp32 everywhere). `details` names the weights and the formula; it is stored beside every
score, so a change of weights invalidates cached scores. Packages we do not depend on (the
`image-reward` package) are imported on use and fail with one line naming the extra to install.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xdpo.evaluate.loading import (
    MissingExtraError,
    WeightsError,
    fingerprint,
    first_line,
    from_pretrained,
    load_weights,
    require,
    resolve_device,
    weights_file,
)
from xdpo.evaluate.scorers import FunctionScorer, Scorer, register_scorer

__all__ = ["MissingExtraError", "WeightsError", "aesthetic", "clip_score", "imagereward", "pickscore"]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MODEL = "openai/clip-vit-large-patch14"
# The LAION "improved aesthetic predictor" v2 MLP (christophschuhmann/improved-aesthetic-predictor),
# mirrored on the hub; `--weights aesthetic=PATH` takes a local copy (.pth or .safetensors).
AESTHETIC_FILE = ("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
IMAGEREWARD_MODEL = "ImageReward-v1.0"


def _where(model: Any, ref: str) -> str:
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return f"{ref}@{commit[:10]}" if commit else ref


def _features(out: Any) -> Any:
    """transformers 4 returns the projected features; 5 returns an output whose pooler_output they are."""
    import torch

    return out if torch.is_tensor(out) else out.pooler_output


def clip_embeddings(
    model: Any, processor: Any, images: list[Image.Image], prompts: list[str], device: str
) -> tuple[Any, Any]:
    """L2-normalised projected CLIP image and text embeddings (float32), texts truncated to 77 tokens."""
    import torch
    import torch.nn.functional as F

    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    max_length = model.config.text_config.max_position_embeddings
    tokens = processor.tokenizer(
        prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.inference_mode():
        img = _features(model.get_image_features(pixel_values=pixels.to(device, model.dtype)))
        txt = _features(
            model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
        )
    return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)


def load_clip(model_ref: str, processor_ref: str, *, key: str, what: str, device: str) -> tuple[Any, Any]:
    """A transformers CLIPModel (eval, on `device`) and its CLIPProcessor."""
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging

    model = from_pretrained(CLIPModel, model_ref, key=key, what=what)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # transformers 5 warns when it falls back to its PIL image processor
    try:
        processor = from_pretrained(CLIPProcessor, processor_ref, key=f"{key}.processor", what=what)
    finally:
        logging.set_verbosity(verbosity)
    return model.eval().requires_grad_(False).to(device), processor


def _clip_similarity_scorer(
    name: str, model_ref: str, processor_ref: str, *, scaled: bool, device: str | None, batch_size: int
) -> Scorer:
    device = resolve_device(device)
    model, processor = load_clip(model_ref, processor_ref, key=name, what=name, device=device)

    def score(images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        img, txt = clip_embeddings(model, processor, images, prompts, device)
        cos = (img * txt).sum(dim=-1)
        if scaled:
            cos = model.logit_scale.detach().float().exp() * cos
        return cos.cpu().double().numpy()

    if scaled:
        formula = "PickScore = logit_scale.exp() x cos(image, text) (not the raw cosine)"
    else:
        formula = "CLIP score = cos(image, text) in [-1, 1] (not x100, not CLIPScore's 2.5*max(cos, 0))"
    where = f"model {_where(model, model_ref)}"
    where += f", processor {processor_ref}" if processor_ref != model_ref else ""
    return FunctionScorer(name, score, f"{formula}; {where}; transformers CLIPModel", batch_size)


@register_scorer("pickscore")
def pickscore(device: str | None = None, weights: str | None = None, processor: str | None = None) -> Scorer:
    """PickScore (Kirstain et al. 2023): `logit_scale.exp() * cos(image, text)`.

    As the official inference code (README of yuvalkirstain/PickScore): CLIPModel
    yuvalkirstain/PickScore_v1 with the laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor, both
    embeddings L2-normalised, the cosine scaled by exp(logit_scale) (= 100): ~20-22 for SD1.5.
    A local `weights` folder that also holds a processor (its image-processor config) supplies both.
    """
    configs = ("preprocessor_config.json", "processor_config.json")  # transformers 4, 5
    if processor is None and weights is not None and any((Path(weights) / c).is_file() for c in configs):
        processor = weights
    return _clip_similarity_scorer(
        "pickscore",
        weights or PICKSCORE_MODEL,
        processor or PICKSCORE_PROCESSOR,
        scaled=True,
        device=device,
        batch_size=16,
    )


@register_scorer("clip")
def clip_score(device: str | None = None, weights: str | None = None, processor: str | None = None) -> Scorer:
    """CLIP image-text similarity: the cosine of the projected embeddings (openai/clip-vit-large-patch14).

    The cosine itself (~0.35 for SD1.5, as in xDPO Table 2); multiply by 100 for the torchmetrics
    "CLIPScore" convention. The model id is in `details`; the processor defaults to the model's.
    """
    model = weights or CLIP_MODEL
    return _clip_similarity_scorer(
        "clip", model, processor or model, scaled=False, device=device, batch_size=32
    )


def aesthetic_mlp(state: dict[str, Any], *, source: str) -> Any:
    """The LAION improved-aesthetic-predictor MLP with `state` loaded (eval mode, dropout off).

    Linear(d, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
    Linear(64, 16), Linear(16, 1); keys `layers.{0,2,4,6,7}.{weight,bias}` (a `layers.` prefix
    is optional). d = 768 for the CLIP ViT-L/14 checkpoint `sac+logos+ava1-l14-linearMSE.pth`.
    """
    import torch.nn as nn

    state = {k.removeprefix("layers."): v for k, v in state.items()}
    if "0.weight" not in state:
        raise WeightsError(f"{source}: no layers.0.weight: not an aesthetic-predictor MLP state dict")
    d = int(state["0.weight"].shape[1])
    mlp = nn.Sequential(
        nn.Linear(d, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{source}: not an aesthetic-predictor MLP ({first_line(e)})") from None
    return mlp.eval().requires_grad_(False)


@register_scorer("aesthetic")
def aesthetic(device: str | None = None, weights: str | None = None, clip: str | None = None) -> Scorer:
    """LAION improved aesthetic predictor v2: `MLP(e / |e|)`, e = CLIP ViT-L/14 image embedding.

    As christophschuhmann/improved-aesthetic-predictor (simple_inference.py): the projected image
    embedding of openai/clip-vit-large-patch14 (here through transformers), L2-normalised, through
    the MLP of `aesthetic_mlp`; ~5-6 for SD1.5 images. Weights loaded with `weights_only=True`.
    """
    import torch
    import torch.nn.functional as F

    device = resolve_device(device)
    path = weights_file(weights, AESTHETIC_FILE, key="aesthetic", what="aesthetic")
    mlp = aesthetic_mlp(load_weights(path, what="aesthetic MLP"), source=path).to(device)
    clip_ref = clip or AESTHETIC_CLIP
    model, processor = load_clip(clip_ref, clip_ref, key="aesthetic.clip", what="aesthetic", device=device)
    if model.config.projection_dim != mlp[0].in_features:
        raise WeightsError(
            f"{path}: the MLP takes {mlp[0].in_features}-d embeddings, {clip_ref} gives {model.config.projection_dim}"
        )

    def score(images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            emb = _features(model.get_image_features(pixel_values=pixels.to(device, model.dtype)))
            out = mlp(F.normalize(emb.float(), dim=-1))
        return out[:, 0].cpu().double().numpy()

    name = Path(path).name if weights is None else str(path)
    details = (
        f"LAION improved aesthetic predictor v2: MLP({name}, {fingerprint(path)}) on the L2-normalised "
        f"CLIP image embedding of {_where(model, clip_ref)}"
    )
    return FunctionScorer("aesthetic", score, details, batch_size=32)


@register_scorer("imagereward")
def imagereward(device: str | None = None, weights: str | None = None, config: str | None = None) -> Scorer:
    """ImageReward v1.0 (Xu et al. 2023) through the official `image-reward` package.

    `RM.load("ImageReward-v1.0")` (THUDM/ImageReward) or a local checkpoint (`weights`, with its
    `med_config.json` as `config`, else the one beside it); `model.score(prompt, images)` per prompt.
    """
    import torch

    rm = require("ImageReward", "imagereward", "imagereward")
    device = resolve_device(device)
    ref = IMAGEREWARD_MODEL
    if weights is not None:
        ref = str(Path(weights).expanduser())
        if not Path(ref).is_file():
            raise WeightsError(f"--weights imagereward: {weights} is not a file")
        beside = Path(ref).with_name("med_config.json")
        config = config or (str(beside) if beside.is_file() else None)
    try:
        model = rm.load(ref, device=device, med_config=config)
    except Exception as e:
        raise WeightsError(
            f"imagereward: cannot load {ref} ({first_line(e)}); offline? pass --weights imagereward=PATH "
            "(ImageReward.pt) and --weights imagereward.config=PATH (med_config.json)"
        ) from None

    def score(images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        by_prompt: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            by_prompt[p].append(i)
        out = np.empty(len(images), dtype=np.float64)
        with torch.no_grad():
            for prompt, idx in by_prompt.items():
                rewards = model.score(prompt, [images[i] for i in idx])
                out[idx] = np.atleast_1d(np.asarray(rewards, dtype=np.float64))
        return out

    version = getattr(rm, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as pkg_version

        try:
            version = pkg_version("image-reward")
        except PackageNotFoundError:
            version = "?"
    source = "THUDM/ImageReward" if weights is None else f"{ref} ({fingerprint(ref)})"
    return FunctionScorer(
        "imagereward", score, f"ImageReward v1.0 ({source}) via image-reward {version}", batch_size=8
    )
