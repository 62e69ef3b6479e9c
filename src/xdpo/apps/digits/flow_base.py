"""Build `digits-flow`: the flow-matching twin of the digits base, a genuine `StableDiffusion3Pipeline` folder.

Recipe (`build_flow_base`), all on CPU, deterministic for a given seed and thread count:
1. The autoencoder is digits-base's `AutoencoderKL` (32x32x3 -> 4x8x8), weights unchanged; its config
   gets SD3's latent normalisation ``z = (mean(x) - shift_factor) * scaling_factor`` with
   ``shift_factor = mean`` and ``scaling_factor = 1 / std`` of the latent means over the real digits.
2. Two small `CLIPTextModelWithProjection` (hidden 16, projection 16, 2 layers; `text_encoder` and
   `text_encoder_2`, the real CLIP tokenizer for both, no T5), trained jointly with a small
   `SD3Transformer2DModel` (patch 1 on the 8x8 latents = 64 image tokens, 3 joint blocks, 2 heads x 32,
   joint_attention_dim 32 = 16 + 16, pooled_projection_dim 32) by rectified flow exactly as SD3 and
   xdpo's own training (`xdpo.models.noise.FlowProcess`): ``x_s = (1 - s) x0 + s eps``,
   ``loss = mse(transformer(x_s, 1000 s, cond), eps - x0)``, s = sigma_k = (k + 1) / 1000 (the scheduler's
   sigmas at shift 1) with k = floor(1000 sigmoid(N(0, 1))) (logit-normal, `sample_timesteps`), captions
   from `data.TRAIN_TEMPLATES` dropped to "" with probability CFG_DROP; EMA weights of all three
   (diffusers' `EMAModel`) are saved.
   (The shipped folder was trained on the continuous s = sigmoid(N(0, 1)).)
   ``cond`` is `StableDiffusion3Pipeline.encode_prompt` itself, run with gradients each step on the 61
   distinct captions: CLIP penultimate states of both encoders concatenated on features, then the
   zero "T5" tokens on the sequence; pooled = both projected EOS embeddings.
   The pipeline samples with ``max_sequence_length=256`` zero T5 tokens (77 + 256 context tokens).
   All 256 are identical at every layer, so training encodes one and gives its attention logit
   ``+log 256`` (`xdpo.models.padding.CollapsedJointAttnProcessor`): the same function
   (`collapsed_matches_full` checks it) at a quarter of the cost. xdpo's pipeline loader does the same
   when sampling (`xdpo.models.padding.collapse_zero_padding`).
3. `FlowMatchEulerDiscreteScheduler` with shift 1.0: the SD3 paper's shift (3.0 at 1024 px) compensates
   for high-resolution latents keeping their signal at a given noise level; 8x8x4 latents are far below
   its 256 px/shift-1 base setting (sampling the shipped model with shift 3.0 changed nothing: 98%/98%).
4. `save_pretrained` (text_encoder_3 / tokenizer_3 = None); 4,000 steps, batch 64, AdamW 1e-3 one-cycle.

Shipped folder (seed 0, one thread; 12.1 MB; transformer 0.43M params, each text encoder 0.8M, almost all
the 49,408-token embedding): built in 46 min wall on a 2-core machine shared with other jobs (load ~4;
~0.33 s/step on a free core, ~23 min). Prompted-digit accuracy (labeller classifier, canonical prompts,
200 samples, seed 1234) at the defaults, 25 Euler steps and guidance 3.0: 1.000 (guidance 2.0 / 4.0: 1.000,
5.0: 0.985); held-out phrasings 0.99. Load it with ``text_encoder_3=None, tokenizer_3=None``
(xdpo's loader `xdpo.evaluate.pipeline.load_pipeline` does; `load_flow_pipeline` calls it).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdpo.apps.digits.base import descend
from xdpo.apps.digits.base import make_text_encoder as make_base_text_encoder
from xdpo.apps.digits.data import TRAIN_TEMPLATES, caption, load_digit_images
from xdpo.models.noise import FlowProcess
from xdpo.models.padding import CollapsedJointAttnProcessor
from xdpo.models.small import components
from xdpo.objectives.timesteps import sample_timesteps

CFG_DROP = 0.1
TEXT_HIDDEN = 16
JOINT_DIM = 2 * TEXT_HIDDEN  # CLIP-L + CLIP-G penultimate states, concatenated
FLOW_SHIFT = 1.0
T5_TOKENS = 256  # StableDiffusion3Pipeline.__call__'s default max_sequence_length


@dataclass(frozen=True)
class FlowRecipe:
    """Training and default-sampling settings of one build; `quick()` is a seconds-long smoke build."""

    steps: int = 4000
    batch: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.999
    layers: int = 3
    heads: int = 2
    head_dim: int = 32
    patch_size: int = 1
    sample_steps: int = 25
    guidance: float = 3.0  # 2.0-4.0: 100%, 5.0: 98.5% (200 samples); see xdpo_digits.json

    @classmethod
    def quick(cls) -> FlowRecipe:
        return cls(steps=3, batch=8)


def make_text_encoder():
    return make_base_text_encoder(with_projection=True)


def make_transformer(r: FlowRecipe):
    """The recipe's `SD3Transformer2DModel` on the 8x8x4 latents (`xdpo.models.small.components`)."""
    return components.sd3_transformer(
        sample_size=8,
        latent_channels=4,
        patch_size=r.patch_size,
        layers=r.layers,
        heads=r.heads,
        head_dim=r.head_dim,
        joint_attention_dim=JOINT_DIM,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        pos_embed_max_size=8 // r.patch_size,
    )


def make_scheduler():
    return components.flow_scheduler(FLOW_SHIFT)


def collapsed_matches_full(transformer, seed: int = 0, copies: int = T5_TOKENS) -> float:
    """Max |difference| between the transformer on 77 random + `copies` zero context tokens (stock
    processor) and on 77 + 1 with `CollapsedJointAttnProcessor`: ~1e-6 when the collapse is exact."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    clip = torch.randn(2, 77, c.joint_attention_dim, generator=g)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    t = torch.tensor([250.0, 800.0])
    zeros = torch.zeros(2, copies, c.joint_attention_dim)
    with torch.no_grad():
        transformer.set_attn_processor(JointAttnProcessor2_0())
        full = transformer(x, torch.cat([clip, zeros], 1), pooled, t).sample
        transformer.set_attn_processor(CollapsedJointAttnProcessor(copies))
        short = transformer(x, torch.cat([clip, zeros[:, :1]], 1), pooled, t).sample
        transformer.set_attn_processor(JointAttnProcessor2_0())
    return float((full - short).abs().max())


def _log(msg: str, log) -> None:
    if log:
        log(msg)


def _pipeline(transformer, vae, te1, te2, tokenizer, tokenizer_2):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=make_scheduler(),
        vae=vae,
        text_encoder=te1,
        tokenizer=tokenizer,
        text_encoder_2=te2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def train_flow(lat_mean, lat_std, labels, vae, tokenizers, r: FlowRecipe, g: torch.Generator, log=print):
    """Train transformer + both text encoders jointly (module docstring, step 2); return them holding their
    EMA weights (diffusers' `EMAModel`, as `xdpo.apps.digits.base.train_unet_text`)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.training_utils import EMAModel

    transformer, te1, te2 = make_transformer(r), make_text_encoder(), make_text_encoder()
    transformer.set_attn_processor(CollapsedJointAttnProcessor(T5_TOKENS))
    pipe = _pipeline(transformer, vae, te1, te2, *tokenizers)
    process = FlowProcess(pipe.scheduler)  # shift FLOW_SHIFT = 1: sigma_k = (k + 1) / N
    # caption table: [10 digits x T templates] + the empty caption (index -1)
    caps = [caption(d, t) for d in range(10) for t in TRAIN_TEMPLATES] + [""]
    n_t = len(TRAIN_TEMPLATES)
    models = (transformer, te1, te2)
    params = [p for m in models for p in m.parameters()]
    ema = EMAModel(params, decay=r.ema_decay)
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=1e-2)
    lr_s = torch.optim.lr_scheduler.OneCycleLR(opt, r.lr, total_steps=max(r.steps, 2), pct_start=0.05)
    labels = torch.as_tensor(labels)
    t0, run = time.time(), 0.0
    for step in range(r.steps):
        emb, _, pooled, _ = pipe.encode_prompt(
            caps,
            None,
            None,
            device=torch.device("cpu"),
            do_classifier_free_guidance=False,
            max_sequence_length=1,
        )
        idx = torch.randint(0, len(lat_mean), (r.batch,), generator=g)
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        cap = labels[idx] * n_t + torch.randint(0, n_t, (r.batch,), generator=g)
        cap = torch.where(torch.rand(r.batch, generator=g) < CFG_DROP, len(caps) - 1, cap)
        k = sample_timesteps(r.batch, process.num_steps, sampling="logit_normal", generator=g)
        xs, target = process.noise(x0, torch.randn(x0.shape, generator=g), k)
        pred = transformer(xs, emb[cap], pooled[cap], process.model_timestep(k)).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        run = descend(loss, opt, params, lr_s, ema, run if step else None)
        if step % 250 == 0 or step == r.steps - 1:
            _log(f"flow step {step}: loss {run:.4f} ({time.time() - t0:.0f} s)", log)
    ema.copy_to(params)
    transformer.set_attn_processor(JointAttnProcessor2_0())
    return tuple(m.eval().requires_grad_(False) for m in models)


def build_flow_base(
    out: str | Path,
    seed: int = 0,
    threads: int = 1,
    quick: bool = False,
    log=print,
    recipe: FlowRecipe | None = None,
) -> dict:
    """Build the digits-flow pipeline into `out`; return a summary (also saved as xdpo_digits.json).

    The autoencoder and tokenizer files are read from the shipped digits-base folder.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from xdpo.apps.digits import base_model_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(seed)
    r = recipe or (FlowRecipe.quick() if quick else FlowRecipe())
    t_start = time.time()
    base = base_model_path()
    vae = AutoencoderKL.from_pretrained(base / "vae").eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(base / "tokenizer")
    grey, labels = load_digit_images(32)
    x = torch.from_numpy(grey).float().div(127.5).sub(1.0)[:, None].repeat(1, 3, 1, 1)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    shift = float(post.mean.mean())
    sf = float(1.0 / (post.mean - shift).std())
    vae.register_to_config(shift_factor=shift, scaling_factor=sf)
    _log(f"vae: digits-base's, shift_factor {shift:.4f}, scaling_factor {sf:.4f}", log)
    g = torch.Generator().manual_seed(seed + 1)
    transformer, te1, te2 = train_flow(
        (post.mean - shift) * sf, post.std * sf, labels, vae, (tok, tok), r, g, log
    )
    pipe = _pipeline(transformer, vae, te1, te2, tok, copy.deepcopy(tok))
    pipe.save_pretrained(out, safe_serialization=True)
    # digits-base's vocab.json + merges.txt, as in SD (transformers 5 saves only a 3.6 MB tokenizer.json)
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out / name)
        shutil.copytree(base / "tokenizer", out / name)
    parts = {"vae": vae, "text_encoder": te1, "text_encoder_2": te2, "transformer": transformer}
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    summary = {
        "recipe": asdict(r),
        "quick": quick,
        "seed": seed,
        "threads": threads,
        "vae": "digits-base's AutoencoderKL (same weights)",
        "shift_factor": shift,
        "scaling_factor": sf,
        "cfg_drop": CFG_DROP,
        "flow_shift": FLOW_SHIFT,
        "timestep_sampling": "logit-normal(0, 1) over the scheduler's 1000 sigmas",
        "sampling": default_sampling(r),
        "params": n_params,
        "seconds": {"total": round(time.time() - t_start, 1)},
        "torch": torch.__version__,
    }
    (out / "xdpo_digits.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log(f"saved {out} in {summary['seconds']['total']:.0f} s", log)
    return summary


def default_sampling(r: FlowRecipe | None = None) -> dict:
    """The default `StableDiffusion3Pipeline` call settings of a recipe (stored in xdpo_digits.json)."""
    r = r or FlowRecipe()
    return {"steps": r.sample_steps, "guidance": r.guidance, "max_sequence_length": T5_TOKENS}


def load_flow_pipeline(path: str | Path) -> Any:
    """A digits-flow folder through xdpo's one loader (`xdpo.evaluate.pipeline.load_pipeline`): its own
    scheduler, CPU, float32, no progress bars. diffusers (0.42) loads the folder's null text_encoder_3 /
    tokenizer_3 only when they are passed as None too (`xdpo.models.load.null_components` does that)."""
    from xdpo.evaluate.pipeline import load_pipeline

    return load_pipeline(path, scheduler="default", device="cpu", dtype="fp32")


def measure_flow_accuracy(
    path: str | Path,
    n_per_digit: int = 20,
    seed: int = 1234,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 100,
) -> dict:
    """Fraction of samples the labeller's classifier reads as the prompted digit (canonical prompts).

    `steps` / `guidance` default to the folder's recorded sampling settings; image i starts from the
    i-th draw of ``torch.Generator().manual_seed(seed)`` (independent of batching).
    """
    from xdpo.apps.digits.labeller import alignment
    from xdpo.evaluate.pipeline import generate

    path = Path(path)
    rec = json.loads((path / "xdpo_digits.json").read_text()).get("sampling", default_sampling())
    steps = steps or rec["steps"]
    guidance = rec["guidance"] if guidance is None else guidance
    pipe = load_flow_pipeline(path)
    prompts = [caption(d) for d in range(10) for _ in range(n_per_digit)]
    c = pipe.transformer.config
    shape = (len(prompts), c.in_channels, c.sample_size, c.sample_size)
    lat = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    images = generate(
        pipe, prompts, steps=steps, guidance=guidance, latents=lat, batch_size=batch_size, progress=False
    )
    acc = alignment(images, prompts)
    return {
        "accuracy": float(np.mean(acc)),
        "n": len(prompts),
        "steps": steps,
        "guidance": guidance,
        "images": images,
    }
