"""The optimizer and learning-rate schedule of a run."""

from __future__ import annotations

from typing import Any

import torch

from xdpo.errors import XdpoError


def learning_rate(train_cfg: Any, world: int) -> float:
    """`train.learning_rate`, times the effective batch (pairs per optimizer step) when `train.scale_lr`,
    as Diffusion-DPO's launchers do."""
    t = train_cfg
    return t.learning_rate * (t.batch_size * t.grad_accum * world if t.scale_lr else 1)


def text_encoder_lr(cfg: Any, world: int) -> float:
    """The text encoders' LoRA learning rate: `model.lora_text_encoder_lr` (empty = `train.learning_rate`),
    scaled by the effective batch as `learning_rate` scales the denoiser's (`train.scale_lr`)."""
    t = cfg.train
    base = cfg.model.lora_text_encoder_lr or t.learning_rate
    return learning_rate(t, world) * base / t.learning_rate


def make_optimizer(
    train_cfg: Any, params: list[torch.nn.Parameter], lr: float,
    extra: tuple[tuple[list[torch.nn.Parameter], float], ...] = (),
) -> torch.optim.Optimizer:  # fmt: skip
    """AdamW (torch, foreach), 8-bit AdamW (bitsandbytes: its two moments in 8 bits with block-wise
    scales, Dettmers et al. 2022) or Adafactor (transformers, fixed lr as Diffusion-DPO's SDXL runs), on
    `params` at `lr`; each of `extra` = (parameters, lr) is a param group of its own after them (the text
    encoders' LoRA at `model.lora_text_encoder_lr`)."""
    t = train_cfg
    if extra:
        params = [{"params": params, "lr": lr}, *({"params": p, "lr": r} for p, r in extra)]
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise XdpoError(
                "train.optimizer=adamw8bit needs bitsandbytes: pip install 'xdpo[bnb]' (or bitsandbytes)"
            ) from None
        return bnb.optim.AdamW8bit(
            params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_epsilon
        )
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, weight_decay=t.weight_decay, scale_parameter=False, relative_step=False,
            warmup_init=False,
        )  # fmt: skip
    return torch.optim.AdamW(
        params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay, eps=t.adam_epsilon,
        foreach=True,
    )  # fmt: skip


def make_scheduler(train_cfg: Any, optimizer: torch.optim.Optimizer) -> Any:
    """Linear warmup over `train.warmup_steps`, then constant (diffusers' `constant_with_warmup`). Not
    prepared by accelerate: its wrapper steps once per process (and skips while accumulating); this one
    steps exactly once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=train_cfg.warmup_steps)
