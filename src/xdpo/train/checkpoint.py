"""Resumable checkpoints (accelerate state + compact model weights), pruning, and the final model.

Layout of `output_dir/checkpoints/step-N/`:
  unet/ or transformer/ (full fine-tune, diffusers format) or adapter_model.safetensors (LoRA, peft keys),
  optimizer.bin, custom_checkpoint_0.pkl (lr scheduler), random_states_*.pkl   (accelerate)
  trainer_state.json                                           (step, pairs_seen, reference state, ...)
  reference.safetensors       (periodic/ema reference: its denoiser weights, or its LoRA snapshot)
  text_encoder_adapters.safetensors   (model.lora_text_encoder: the text encoders' LoRA, `<component>.<peft key>`)
FSDP writes pytorch_model_fsdp_0/ and optimizer_0/ (sharded) instead of the denoiser and optimizer.bin;
DeepSpeed writes pytorch_model/ (the engine's checkpoint: module weights, each process's optimizer shard).
A checkpoint is written to `step-N.tmp` and renamed when complete, so a crash never leaves a
half-written checkpoint that `resume_from=latest` would pick; the next run removes such leftovers
(`clean_partial`). Re-saving an existing step renames the old folder aside first, so the newest
complete checkpoint is never deleted before its replacement is in place.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from xdpo.errors import ConfigError, XdpoError
from xdpo.models.load import pipeline_kwargs
from xdpo.quiet import progress_bars_off
from xdpo.train.card import write_model_card
from xdpo.train.state import STATE_FILE

STEP_DIR = re.compile(r"^step-(\d+)$")
ADAPTER_FILE = "adapter_model.safetensors"
REFERENCE_FILE = "reference.safetensors"
TEXT_ADAPTER_FILE = "text_encoder_adapters.safetensors"
DEEPSPEED_TAG = "pytorch_model"  # accelerate's folder for the DeepSpeed engine's checkpoint


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under output_dir/checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(output_dir: str | Path, resume_from: str) -> Path | None:
    """`train.resume_from`: '' -> None, 'latest' -> newest checkpoint (None if there is none), else a folder."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume_from: {path} is not a complete checkpoint (no trainer_state.json)")
    return path


def clean_partial(output_dir: str | Path) -> list[str]:
    """After a kill: remove half-written `step-N.tmp` folders, and put back a `step-N.old` whose
    replacement never arrived (a kill between the two renames of `save_checkpoint`)."""
    root = Path(output_dir) / "checkpoints"
    done = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        if p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed half-written {p.name}")
        elif p.name.endswith(".old"):
            final = p.with_name(p.name[: -len(".old")])
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.rename(final)
                done.append(f"restored {final.name}")
    return done


def set_aside_newer(output_dir: str | Path, step: int) -> list[Path]:
    """Resuming from an older checkpoint: rename newer ones to `abandoned-step-N` (kept, but never resumed
    from or pruned in place of the new run's own)."""
    moved = []
    for s, path in list_checkpoints(output_dir):
        if s > step:
            target = path.with_name(f"abandoned-{path.name}")
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)
            moved.append(target)
    return moved


def register_model_hooks(accelerator: Any, lora: bool, denoiser: str = "unet") -> None:
    """Save only what is trained: LoRA adapter weights, or the denoiser in diffusers format."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            unet = accelerator.unwrap_model(model)
            if accelerator.is_main_process:
                if lora:
                    from peft.utils import get_peft_model_state_dict
                    from safetensors.torch import save_file

                    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
                    save_file(state, str(Path(output_dir) / ADAPTER_FILE))
                else:
                    with progress_bars_off():  # "Writing model shards" inside the training bar
                        unet.save_pretrained(Path(output_dir) / denoiser)
            if weights:
                weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            unet = accelerator.unwrap_model(models.pop())
            if lora:
                from peft.utils import set_peft_model_state_dict
                from safetensors.torch import load_file

                result = set_peft_model_state_dict(unet, load_file(str(Path(input_dir) / ADAPTER_FILE)))
                if getattr(result, "unexpected_keys", None):
                    raise ConfigError(f"train.resume_from: {input_dir} has adapter keys this model lacks")
            else:
                saved = type(unet).from_pretrained(Path(input_dir) / denoiser)
                unet.load_state_dict(saved.state_dict())
                del saved

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(
    accelerator: Any, output_dir: str | Path, step: int, state: Any, keep: int, tensors: dict | None = None,
    text_adapters: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """accelerate state + trainer_state.json (`state`, a `TrainerState`) (+ `tensors` as
    reference.safetensors, + the LoRA weights of the trained `text_adapters` encoders) into
    checkpoints/step-N (atomically), then prune to `keep`."""
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"step-{step}", root / f"step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if tensors:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp / REFERENCE_FILE))
        if text_adapters:
            from safetensors.torch import save_file

            from xdpo.models.lora import text_adapter_state

            save_file(text_adapter_state(text_adapters), str(tmp / TEXT_ADAPTER_FILE))
        (tmp / STATE_FILE).write_text(state.to_json())
        old = root / f"step-{step}.old"
        if (
            final.exists()
        ):  # the same step saved again (e.g. at the end of a resumed run): swap, never delete first
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        if keep > 0:
            for _, old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: Path) -> dict[str, torch.Tensor]:
    """Restore model, optimizer, scheduler and RNG; return the saved reference tensors (the trainer state is
    read once, before: `TrainerState.read`)."""
    from safetensors.torch import load_file

    accelerator.load_state(str(path))
    return load_file(str(path / REFERENCE_FILE)) if (path / REFERENCE_FILE).is_file() else {}


def load_text_adapters(encoders: dict[str, Any], path: Path) -> None:
    """The text encoders' LoRA weights of checkpoint `path` back into `encoders` (none: nothing to do)."""
    if not encoders:
        return
    from safetensors.torch import load_file

    from xdpo.models.lora import load_text_adapter_state

    if not (path / TEXT_ADAPTER_FILE).is_file():
        raise ConfigError(f"train.resume_from: {path} has no {TEXT_ADAPTER_FILE} (model.lora_text_encoder)")
    load_text_adapter_state(encoders, load_file(str(path / TEXT_ADAPTER_FILE)), str(path))


def resume_point(accelerator: Any, output_dir: Path, resume_from: str) -> Path | None:
    """The checkpoint to resume from (after cleaning up a killed save); refuse to start fresh over an
    existing run's checkpoints."""
    if accelerator.is_main_process:
        for note in clean_partial(output_dir):
            accelerator.print(f"Checkpoints: {note}")
    accelerator.wait_for_everyone()
    resume = resolve_resume(output_dir, resume_from)
    if resume_from == "latest" and resume is None:
        accelerator.print(f"No checkpoint in {Path(output_dir) / 'checkpoints'}: starting fresh")
    if resume is None and list_checkpoints(output_dir):
        raise XdpoError(
            f"{output_dir} already has checkpoints; set train.resume_from=latest to continue, or choose a new output_dir"
        )
    return resume


def summary_json(state: Any) -> str:
    """final/train_summary.json: the steps trained and the trainer state at the end."""
    d = asdict(state)
    return json.dumps({"steps": d.pop("step"), **d}, indent=2)


def deepspeed_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 weights of a DeepSpeed ZeRO-1/2/3 checkpoint written by `save_checkpoint`: the
    optimizer's fp32 master weights for what was trained (the model itself holds 16-bit copies under
    bf16/fp16), the saved module weights for the frozen rest. DeepSpeed's own files (trusted: written by
    this run) are read with its loader."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # its per-file progress lines
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG))


def make_ema(params: list[torch.nn.Parameter], decay: float) -> Any:
    """diffusers' `EMAModel` of the trained parameters (`train.ema_decay` > 0), None without one. Its decay
    warms up as diffusers' default: min(decay, (1 + n) / (10 + n)) after n updates."""
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay)


@contextmanager
def ema_weights(ema: Any, params: list[torch.nn.Parameter]):
    """The EMA's weights in `params` inside the block, the trained ones back after it."""
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def save_final(
    accelerator: Any, model: Any, cfg: Any, comps: Any, out: Path, step: int, checkpoint: Path | None = None
) -> None:
    """LoRA: final/pytorch_lora_weights.safetensors (the family pipeline's `load_lora_weights(final)`).
    Full: a complete pipeline folder with the trained denoiser (`<FamilyPipeline>.from_pretrained(final)`,
    or `DiffusionPipeline.from_pretrained(final)`), with the components the run trained with.
    DeepSpeed: the weights come from `checkpoint` (this step's, just saved), in fp32. Then xdpo.json and the
    model card (README.md)."""
    # FSDP: the whole weights, gathered by every process (a collective), saved by the main one
    whole = accelerator.get_state_dict(model) if accelerator.distributed_type.name == "FSDP" else None
    if not accelerator.is_main_process:
        return
    if accelerator.distributed_type.name == "DEEPSPEED":
        whole = deepspeed_weights(checkpoint)
    fam = comps.family
    pipeline_cls = fam.pipeline_cls()
    model = accelerator.unwrap_model(model)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.model.lora_rank > 0:
        from xdpo.models.lora import save_adapters

        save_adapters(fam, model, out, whole, text_encoders=getattr(comps, "text_lora", None))
    else:
        if whole is not None:  # an unsharded copy of the model's own diffusers class
            cls = next(c for c in type(model).__mro__ if c.__module__.startswith("diffusers."))
            plain = cls.from_config(model.config)
            plain.load_state_dict({k: v.to(torch.float32) for k, v in whole.items()})
            model = plain
        kw = pipeline_kwargs(cfg.model, fam, cfg.family)
        with progress_bars_off():
            pipe = pipeline_cls.from_pretrained(comps.path, **{fam.denoiser: model}, **kw)
            pipe.save_pretrained(out)
    info = {
        "base_model": comps.path,
        "family": fam.name,
        "pipeline_class": fam.pipeline_class,
        "step": step,
        "lora": cfg.model.lora_rank > 0,
        "lora_type": cfg.model.lora_type if cfg.model.lora_rank > 0 else None,
        "text_encoder_lora": sorted(getattr(comps, "text_lora", {})),  # text encoders with LoRA in final/
        "vae": cfg.model.vae or None,
    }
    (out / "xdpo.json").write_text(json.dumps(info, indent=2))
    write_model_card(out, cfg, info)  # README.md: the run's real values (xdpo.train.card)
