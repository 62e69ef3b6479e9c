"""Tiny random-weight SDXL, SD3/SD3.5 and Flux.1 pipelines in the real diffusers formats, for tests.

Each `build_tiny_*_pipeline` `save_pretrained`s a folder that its diffusers pipeline class
(`StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`, `FluxPipeline`) loads offline: the real
architectures and component classes (as diffusers' own pipeline tests build them), only narrow.
With the defaults latents are 8 x 8 and images `tiny_resolution(8)` = 16 px (the VAE downsamples x2).

- CLIP: the real CLIP tokenizer (open_clip's BPE file, `xdpo.models.tokenizer`); "CLIP-L" has hidden
  size 16 and "CLIP-G" 24 (projection 32), so a swapped or mis-concatenated encoder changes a shape.
- T5: a 2-layer `T5EncoderModel` (gated-gelu, as T5 v1.1) and a `T5TokenizerFast` around a small
  `tokenizers` Unigram model: T5's special tokens (`<pad>` 0, `</s>` 1, `<unk>` 2), the test captions'
  words, the first 300 whole words (3+ letters) of the CLIP BPE merges and single characters.
- SDXL: UNet with `addition_embed_type="text_time"`, cross-attention over both CLIP encoders (16 + 24),
  projection_class_embeddings_input_dim = 6 x addition_time_embed_dim + CLIP-G's projection;
  SDXL's Euler scheduler (SD's scaled-linear betas, epsilon).
- SD3: CLIP-L + CLIP-G with projection, T5 (or none), `SD3Transformer2DModel` (patch 2), SD3's VAE
  normalisation and `FlowMatchEulerDiscreteScheduler(shift=3.0)`; `sd35=True` adds SD3.5's qk RMS norm
  and a dual-attention block.
- Flux: CLIP (pooled) + T5, `FluxTransformer2DModel` (1 double + 1 single block, rope axes 4 + 4 + 8 =
  head dim 16), FLUX.1's VAE normalisation, FLUX.1-dev's scheduler (dynamic shifting), and
  `guidance_embeds` as FLUX.1-dev (True) or schnell (False).
On disk: SDXL 17 MB, SD3 16 MB, Flux 8 MB, mostly the CLIP token embeddings (49,408 x 16 / 24) and the
CLIP tokenizer folders (3.5 MB each). Denoisers: SDXL UNet 0.35M, SD3 transformer 0.08M, Flux 0.08M parameters.
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path
from typing import Any

from xdpo.errors import ConfigError
from xdpo.models.tiny import clip_tokenizer, tiny_clip_text_encoder, tiny_resolution, tiny_vae

CLIP_L_HIDDEN, CLIP_G_HIDDEN, CLIP_G_PROJECTION = 16, 24, 32
T5_D_MODEL = 48
T5_WORDS = 300
CAPTION_WORDS = (
    "a an the of and with by in on picture photo image painting drawing scan digit number handwritten "
    "written hand bright dark zero one two three four five six seven eight nine cat dog squirrel eating burger"
)
"""Words of the tests' and the digits world's captions, whole pieces in the tiny T5 vocabulary."""
FAMILY_VAE_BLOCKS = (16, 32)
"""Two blocks as `xdpo.models.tiny.VAE_BLOCKS` (so `tiny_resolution` holds), narrower."""

SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "prediction_type": "epsilon",
}
"""stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json (EulerDiscreteScheduler)."""

SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
"""stabilityai/stable-diffusion-3-medium-diffusers' scheduler_config.json."""

FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""black-forest-labs/FLUX.1-dev's scheduler_config.json."""

SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SDXL_VAE = {"scaling_factor": 0.13025}


def _check_side(sample_size: int) -> None:
    if sample_size < 4 or sample_size % 2:
        raise ConfigError(f"sample_size must be even and >= 4 (UNet halving, 2x2 patches), got {sample_size}")


def _family_vae(latent_channels: int, sample_size: int, flow: dict[str, float] | None) -> Any:
    """The shared VAE: SDXL's normalisation (with quant convs) or SD3's / Flux's (shift, no quant convs)."""
    kw = dict(flow) if flow else dict(SDXL_VAE)
    return tiny_vae(
        latent_channels=latent_channels,
        image_size=tiny_resolution(sample_size),
        blocks=FAMILY_VAE_BLOCKS,
        norm_groups=8,
        quant_conv=flow is None,
        **kw,
    )


def _clip_pair(tokenizer: Any, *, project_l: bool) -> tuple[Any, Any]:
    """("CLIP-L", "CLIP-G"): hidden 16 (projected to 16 for SD3) and hidden 24 projected to 32."""
    clip_l = tiny_clip_text_encoder(
        tokenizer, hidden_size=CLIP_L_HIDDEN, projection_dim=CLIP_L_HIDDEN if project_l else None
    )
    clip_g = tiny_clip_text_encoder(tokenizer, hidden_size=CLIP_G_HIDDEN, projection_dim=CLIP_G_PROJECTION)
    return clip_l, clip_g


# ---- T5 --------------------------------------------------------------------------------------------------


def _frequent_words(n: int) -> list[str]:
    """The first `n` whole alphabetic words merged in the CLIP BPE file (roughly by frequency)."""
    from xdpo.models.tokenizer import N_MERGES, open_clip_bpe_path

    with gzip.open(open_clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")[1 : N_MERGES + 1]
    words: list[str] = []
    for line in lines:
        word = "".join(line.split())
        if word.endswith("</w>") and word[:-4].isascii() and word[:-4].isalpha() and len(word) > 6:
            words.append(word[:-4])
            if len(words) == n:
                break
    return words


def t5_vocabulary(n_words: int = T5_WORDS) -> list[tuple[str, float]]:
    """Unigram (piece, log-probability) pairs: T5's specials, "▁", whole words, single characters."""
    import string

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    words = list(dict.fromkeys([*CAPTION_WORDS.split(), *_frequent_words(n_words)]))
    vocab += [("\u2581" + w, -6.0 - i / 100) for i, w in enumerate(words)]
    chars = string.ascii_letters + string.digits + string.punctuation
    seen = {piece for piece, _ in vocab}
    vocab += [(c, -12.0) for c in chars]
    vocab += [("\u2581" + c, -11.0) for c in chars if "\u2581" + c not in seen]
    return vocab


def build_t5_tokenizer(out_dir: str | Path | None = None, *, max_length: int = 512) -> Any:
    """A `T5TokenizerFast` around a small Unigram model (T5's pre-tokenizer and `</s>` suffix); saved
    in `out_dir` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram(t5_vocabulary(), unk_id=2, byte_fallback=False))
    metaspace = {"replacement": "\u2581", "prepend_scheme": "always", "split": True}
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    tok.decoder = decoders.Metaspace(**metaspace)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    t5 = T5TokenizerFast(
        tokenizer_object=tok,
        extra_ids=0,
        model_max_length=max_length,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    if out_dir is not None:
        t5.save_pretrained(out_dir)
    return t5


def t5_tokenizer(t5_tokenizer_dir: str | Path | None = None) -> Any:
    if t5_tokenizer_dir is None:
        return build_t5_tokenizer()
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(t5_tokenizer_dir)


def tiny_t5_encoder(tokenizer: Any, d_model: int = T5_D_MODEL) -> Any:
    """A 2-layer `T5EncoderModel` (T5 v1.1 gated-gelu feed-forward) over `tokenizer`'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
    )
    return T5EncoderModel(config)


def _save(pipe: Any, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out


# ---- pipelines ---------------------------------------------------------------------------------------------


def build_tiny_sdxl_pipeline(
    out_dir: str | Path,
    *,
    sample_size: int = 8,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    addition_time_embed_dim: int = 8,
) -> Path:
    """A tiny `StableDiffusionXLPipeline` folder (latents 4 x `sample_size`^2); return its path."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    _check_side(sample_size)
    tokenizer = clip_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = _clip_pair(tokenizer, project_l=False)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + CLIP_G_PROJECTION,
        cross_attention_dim=CLIP_L_HIDDEN + CLIP_G_HIDDEN,
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_family_vae(4, sample_size, None),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        add_watermarker=False,
    )
    return _save(pipe, out_dir)


def build_tiny_sd3_pipeline(
    out_dir: str | Path,
    *,
    with_t5: bool = True,
    sd35: bool = False,
    sample_size: int = 8,
    latent_channels: int = 16,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    t5_tokenizer_dir: str | Path | None = None,
) -> Path:
    """A tiny `StableDiffusion3Pipeline` folder; without T5 `text_encoder_3`/`tokenizer_3` are None
    (the pipeline then conditions on zeros in T5's place)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    _check_side(sample_size)
    tokenizer = clip_tokenizer(tokenizer_dir)
    t5_tok = t5_tokenizer(t5_tokenizer_dir) if with_t5 else None
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = _clip_pair(tokenizer, project_l=True)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_D_MODEL,  # >= 16 + 24: the CLIP states are zero-padded to T5's width
        caption_projection_dim=32,  # = heads x head dim, as in SD3
        pooled_projection_dim=CLIP_L_HIDDEN + CLIP_G_PROJECTION,
        pos_embed_max_size=2 * sample_size,
        qk_norm="rms_norm" if sd35 else None,
        dual_attention_layers=(0,) if sd35 else (),
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER),
        vae=_family_vae(latent_channels, sample_size, SD3_VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5_encoder(t5_tok) if with_t5 else None,
        tokenizer_3=t5_tok,
    )
    return _save(pipe, out_dir)


def build_tiny_flux_pipeline(
    out_dir: str | Path,
    *,
    guidance_embeds: bool = True,
    sample_size: int = 8,
    latent_channels: int = 16,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    t5_tokenizer_dir: str | Path | None = None,
) -> Path:
    """A tiny `FluxPipeline` folder (FLUX.1-dev-like with `guidance_embeds`, schnell-like without)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    _check_side(sample_size)
    tokenizer = clip_tokenizer(tokenizer_dir)
    t5_tok = t5_tokenizer(t5_tokenizer_dir)
    torch.manual_seed(seed)
    text_encoder = tiny_clip_text_encoder(tokenizer, hidden_size=CLIP_L_HIDDEN)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_L_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER),
        vae=_family_vae(latent_channels, sample_size, FLUX_VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5_encoder(t5_tok),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    return _save(pipe, out_dir)


def build_all(out_dir: str | Path) -> dict[str, Path]:
    """Every tiny family pipeline under `out_dir` (one shared tokenizer build): name -> folder."""
    from xdpo.models.tiny import build_tiny_pipeline

    root = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="xdpo-tok-") as tmp:
        clip_dir, t5_dir = Path(tmp) / "clip", Path(tmp) / "t5"
        clip_tokenizer().save_pretrained(clip_dir)
        build_t5_tokenizer(t5_dir)
        toks = {"tokenizer_dir": clip_dir}
        return {
            "sd": build_tiny_pipeline(root / "sd", sample_size=8, **toks),
            "sdxl": build_tiny_sdxl_pipeline(root / "sdxl", **toks),
            "sd3": build_tiny_sd3_pipeline(root / "sd3", t5_tokenizer_dir=t5_dir, **toks),
            "flux": build_tiny_flux_pipeline(root / "flux", t5_tokenizer_dir=t5_dir, **toks),
        }
