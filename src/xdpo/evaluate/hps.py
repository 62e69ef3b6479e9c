"""HPSv2 and HPSv2.1 (Wu et al. 2023): cos(image, text) under an open_clip ViT-H-14 fine-tuned on HPDv2.

Score = <f_img/|f_img|, f_txt/|f_txt|> with the HPS checkpoint from the hub repo xswu/HPSv2
(`HPS_v2_compressed.pt` = v2.0, `HPS_v2.1_compressed.pt` = v2.1), as `hpsv2.score()` returns it;
papers and the HPSv2 benchmark print it x100 (~27 for SD1.5). v2.0 and v2.1 are different
models whose scores are not comparable: the version is in the scorer name (`hpsv2.0`, `hpsv2.1`;
`hpsv2` means v2.0, the default of `hpsv2.score`) and in `details`.

Preprocessing as hpsv2's `preprocess_val` (`light_augmentation=True`): to a [0, 1] tensor, the
longest side resized to 224 (bicubic, antialiased, on the float tensor as torchvision >= 0.17
does), zero-padded to 224 x 224 (centred), normalised with the OpenAI CLIP mean and std.

Two backends compute the same function from the same state dict:
- `open_clip` (default): open_clip's own ViT-H-14 code, as hpsv2 runs it. Needs `open_clip_torch`,
  hence a torchvision that imports beside your torch: `pip install "xdpo[hpsv2]"`.
- `transformers`: the open_clip state dict mapped onto a transformers CLIPModel (no extra), texts
  cleaned as open_clip does and tokenised by the CLIP tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K
  (the same BPE, so the same ids).
Both run in fp32 (hpsv2 runs under CUDA autocast, which moves the cosine by ~1e-4).
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

import numpy as np
from PIL import Image

from xdpo.errors import ConfigError
from xdpo.evaluate.loading import (
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

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
ARCH = "ViT-H-14"
HEADS = {"ViT-H-14": (16, 16)}  # (vision, text): head width 80 x 16 = 1280; 1024 / 16 = 64
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("open_clip", "transformers")


def hps_preprocess(images: list[Image.Image], size: int) -> Any:
    """[B, 3, size, size]: ToTensor, longest side -> size (bicubic, antialias), centred zero pad, normalise."""
    import torch
    import torch.nn.functional as F

    out = []
    for im in images:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        h, w = x.shape[1:]
        scale = size / float(max(h, w))
        if scale != 1.0:
            h, w = round(h * scale), round(w * scale)
            x = F.interpolate(x[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
        pad_h, pad_w = size - h, size - w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        out.append(x)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (torch.stack(out) - mean) / std


def read_hps_checkpoint(path: str) -> dict[str, Any]:
    """The open_clip state dict of an HPS checkpoint ({"state_dict": ...} or bare; "module." stripped)."""
    state = load_weights(path, what="HPSv2")
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
        raise WeightsError(
            f"{path}: not an open_clip CLIP state dict (no visual.conv1.weight/token_embedding.weight)"
        )
    return state


def open_clip_clean(text: str) -> str:
    """open_clip's text cleaning before BPE: ftfy.fix_text (when installed), HTML unescape x2, spaces.

    With it, the transformers CLIP tokenizer gives open_clip's token ids (checked on ordinary,
    accented, HTML-escaped, full-width and mojibake prompts); without ftfy only the last two can differ.
    """
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return " ".join(html.unescape(html.unescape(text)).split())


def _layers(state: dict[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.ln_1\.weight$")
    return 1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1)


def _block(state: dict[str, Any], src: str, dst: str, out: dict[str, Any]) -> None:
    """One open_clip ResidualAttentionBlock -> one transformers CLIPEncoderLayer (q, k, v split)."""
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"{dst}.self_attn.{name}.weight"] = state[f"{src}.attn.in_proj_weight"].chunk(3)[i]
        out[f"{dst}.self_attn.{name}.bias"] = state[f"{src}.attn.in_proj_bias"].chunk(3)[i]
    pairs = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for a, b in pairs.items():
        out[f"{dst}.{b}.weight"] = state[f"{src}.{a}.weight"]
        out[f"{dst}.{b}.bias"] = state[f"{src}.{a}.bias"]


def open_clip_to_transformers(state: dict[str, Any], heads: tuple[int, int], *, source: str = "") -> Any:
    """A transformers CLIPModel holding an open_clip CLIP (ViT image tower, GELU) state dict.

    Sizes come from the tensors; the head counts (vision, text) do not show in shapes and are given.
    """
    from transformers import CLIPConfig, CLIPModel

    try:
        v_width, _, patch, _ = state["visual.conv1.weight"].shape
        n_pos, t_width = (
            state["visual.positional_embedding"].shape[0],
            state["token_embedding.weight"].shape[1],
        )
        grid = math.isqrt(n_pos - 1)
        vocab = state["token_embedding.weight"].shape[0]
        v_layers, t_layers = (
            _layers(state, "visual.transformer.resblocks."),
            _layers(state, "transformer.resblocks."),
        )
        config = CLIPConfig(
            vision_config={
                "hidden_size": v_width,
                "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                "num_hidden_layers": v_layers,
                "num_attention_heads": heads[0],
                "image_size": grid * patch,
                "patch_size": patch,
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-5,
            },
            text_config={
                "vocab_size": vocab,
                "hidden_size": t_width,
                "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                "num_hidden_layers": t_layers,
                "num_attention_heads": heads[1],
                "max_position_embeddings": state["positional_embedding"].shape[0],
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-5,
                "bos_token_id": vocab - 2,  # CLIP BPE: <|startoftext|>, <|endoftext|> are the last ids
                "eos_token_id": vocab - 1,
            },
            projection_dim=state["visual.proj"].shape[1],
        )
        out = {
            "logit_scale": state["logit_scale"],
            "visual_projection.weight": state["visual.proj"].T,
            "text_projection.weight": state["text_projection"].T,
            "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
            "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
            "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
            "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
            "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        }
        for a, b in (
            ("visual.ln_pre", "vision_model.pre_layrnorm"),
            ("visual.ln_post", "vision_model.post_layernorm"),
            ("ln_final", "text_model.final_layer_norm"),
        ):
            out[f"{b}.weight"], out[f"{b}.bias"] = state[f"{a}.weight"], state[f"{a}.bias"]
        for i in range(v_layers):
            _block(state, f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", out)
        for i in range(t_layers):
            _block(state, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", out)
    except KeyError as e:
        raise WeightsError(f"{source}: open_clip state dict lacks {e.args[0]}") from None
    if grid * grid != n_pos - 1 or v_width % heads[0] or t_width % heads[1]:
        raise WeightsError(f"{source}: unexpected shapes for heads {heads} (widths {v_width}, {t_width})")
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in out.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    extra = sorted(set(state) - _used(state, v_layers, t_layers))
    if missing or unexpected or extra:
        raise WeightsError(f"{source}: keys do not map: {(missing + unexpected + extra)[:3]}")
    return model


def _used(state: dict[str, Any], v_layers: int, t_layers: int) -> set[str]:
    """The open_clip keys the mapping consumes (everything else would be silently dropped)."""
    blocks = [f"visual.transformer.resblocks.{i}." for i in range(v_layers)]
    blocks += [f"transformer.resblocks.{i}." for i in range(t_layers)]
    top = {"logit_scale", "visual.proj", "text_projection", "visual.class_embedding", "visual.conv1.weight"}
    top |= {"visual.positional_embedding", "token_embedding.weight", "positional_embedding", "attn_mask"}
    top |= {f"{a}.{b}" for a in ("visual.ln_pre", "visual.ln_post", "ln_final") for b in ("weight", "bias")}
    return {k for k in state if k in top or any(k.startswith(b) for b in blocks)}


def _transformers_backend(state: dict[str, Any], tokenizer: str, arch: str, heads: Any, device: str) -> Any:
    """(image_size, embed(images, prompts) -> (img, txt)) on the transformers port."""
    import torch
    from transformers import CLIPTokenizer

    if heads is None:
        if arch not in HEADS:
            raise ConfigError(f"hpsv2: head counts of {arch!r} unknown (known: {', '.join(HEADS)})")
        heads = HEADS[arch]
    model = (
        open_clip_to_transformers(state, tuple(heads), source=arch).eval().requires_grad_(False).to(device)
    )
    tok = from_pretrained(CLIPTokenizer, tokenizer, key="hpsv2.tokenizer", what="hpsv2 tokenizer")
    context = model.config.text_config.max_position_embeddings

    def embed(pixels: Any, prompts: list[str]) -> tuple[Any, Any]:
        # No attention mask, as open_clip: the causal mask keeps padding out of the end-of-text token.
        ids = tok(
            [open_clip_clean(p) for p in prompts],
            padding=True,
            truncation=True,
            max_length=context,
            return_tensors="pt",
        )["input_ids"]
        with torch.inference_mode():
            img = model.get_image_features(pixel_values=pixels.to(device))
            txt = model.get_text_features(input_ids=ids.to(device))
        return tuple(x if torch.is_tensor(x) else x.pooler_output for x in (img, txt))

    return model.config.vision_config.image_size, embed


def _open_clip_backend(open_clip: Any, state: dict[str, Any], arch: str, device: str) -> Any:
    """(image_size, embed) on open_clip's own model code."""
    import torch

    model = open_clip.create_model(arch, pretrained=None, device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"hpsv2: the checkpoint does not fit open_clip {arch} ({first_line(e)})") from None
    model = model.float().eval().requires_grad_(False).to(device)
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size

    def embed(pixels: Any, prompts: list[str]) -> tuple[Any, Any]:
        with torch.inference_mode():
            return model.encode_image(pixels.to(device)), model.encode_text(tokenizer(prompts).to(device))

    return int(size), embed


def hps_scorer(
    version: str,
    *,
    device: str | None = None,
    weights: str | None = None,
    backend: str = "open_clip",
    tokenizer: str | None = None,
    arch: str = ARCH,
    heads: tuple[int, int] | None = None,
) -> Scorer:
    """HPS `version` ("v2.0" or "v2.1") scorer; `arch`/`heads` exist for tests with tiny models."""
    import torch.nn.functional as F

    if backend not in BACKENDS:
        raise ConfigError(f"hpsv2 backend {backend!r} is not one of {', '.join(BACKENDS)}")
    name = "hpsv2.0" if version == "v2.0" else "hpsv2.1"
    device = resolve_device(device)
    open_clip = None
    if backend == "open_clip":  # fail on the missing extra before any download
        hint = " (open_clip needs a torchvision built for your torch), or use the transformers port: "
        open_clip = require("open_clip", "hpsv2", name, hint + "--hpsv2-backend transformers")
    path = weights_file(weights, (HPS_REPO, HPS_FILES[version]), key=name, what=name)
    state = read_hps_checkpoint(path)
    if backend == "open_clip":
        size, embed = _open_clip_backend(open_clip, state, arch, device)
    else:
        size, embed = _transformers_backend(state, tokenizer or HPS_TOKENIZER, arch, heads, device)

    def score(images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        img, txt = embed(hps_preprocess(images, size), prompts)
        cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(dim=-1)
        return cos.cpu().double().numpy()

    source = f"{HPS_REPO}/{HPS_FILES[version]}" if weights is None else f"{path} ({fingerprint(path)})"
    details = (
        f"HPS {version} ({source}): cos(image, text) of open_clip {arch}, x1 (papers print x100); "
        f"backend {backend}; not comparable with other HPS versions"
    )
    return FunctionScorer(name, score, details, batch_size=16)


@register_scorer("hpsv2.0")
def hpsv2_0(
    device: str | None = None,
    weights: str | None = None,
    backend: str = "open_clip",
    tokenizer: str | None = None,
) -> Scorer:
    """HPS v2.0 (HPS_v2_compressed.pt); `hpsv2` is an alias."""
    return hps_scorer("v2.0", device=device, weights=weights, backend=backend, tokenizer=tokenizer)


@register_scorer("hpsv2.1")
def hpsv2_1(
    device: str | None = None,
    weights: str | None = None,
    backend: str = "open_clip",
    tokenizer: str | None = None,
) -> Scorer:
    """HPS v2.1 (HPS_v2.1_compressed.pt)."""
    return hps_scorer("v2.1", device=device, weights=weights, backend=backend, tokenizer=tokenizer)
