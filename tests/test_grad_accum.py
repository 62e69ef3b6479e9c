"""Gradient accumulation through `accelerator.accumulate`: the gradient of an optimizer step is the mean over
all its micro-batches (and processes), divided once, and the optimizer steps once per `grad_accum` micro-batches.

A run with grad_accum=2 cannot equal one with twice the batch: each micro-batch draws its own (t, eps) from
`mix_seed(seed, step, micro, rank)`. So the loop is compared with the same step computed by hand: the same
micro-batches (`batch_keys`), the same generators, `train_step`, then clipping and the run's optimizer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import run_training, torchrun, train_overrides
from xdpo.config import load_config

ACCUM = {
    "train.max_steps": 1,
    "train.batch_size": 2,
    "train.grad_accum": 2,
    "train.max_grad_norm": 1e6,  # logged, never clipping: the norm itself is compared
    "train.warmup_steps": 0,
}


def by_hand(out, pipe, pairs, world: int = 1, grads: dict | None = None, **overrides):
    """(gradient norm, weights after the optimizer step) of step 1, computed without the loop; `grads`, if
    given, receives each parameter's gradient (before clipping) by name."""
    from accelerate.utils import set_seed

    from xdpo.data import collate_pairs, open_data
    from xdpo.train.batches import batch_keys, mix_seed
    from xdpo.train.optim import make_optimizer
    from xdpo.train.setup import single_process
    from xdpo.train.step import train_step

    cfg = load_config(None, train_overrides(out, pipe, pairs, **{**ACCUM, **overrides}))
    t = cfg.train
    set_seed(cfg.seed)
    m, models = single_process(cfg)
    unet, params = models.policy, models.params
    _, data, n = open_data(cfg)
    for rank in range(world):
        for micro in range(t.grad_accum):
            keys = batch_keys(n, seed=cfg.seed, step=0, micro=micro, grad_accum=t.grad_accum, rank=rank,
                              world=world, batch_size=t.batch_size)  # fmt: skip
            gen = torch.Generator().manual_seed(mix_seed(cfg.seed, 0, micro, rank))
            loss = train_step(m, collate_pairs([data[k] for k in keys]), gen).out.loss.mean()
            (loss / (t.grad_accum * world)).backward()  # DDP averages over processes
    if grads is not None:
        grads.update({k: v.grad.clone() for k, v in unet.named_parameters() if v.grad is not None})
    norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
    make_optimizer(t, params, t.learning_rate).step()
    return norm, {k: v.detach().clone() for k, v in unet.state_dict().items()}


def logged(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_accumulated_step_equals_the_step_by_hand(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """Fails if the loss is divided twice (norm halves), only one micro-batch counts, or the optimizer
    steps per micro-batch (AdamW moves each weight by ~lr per step: twice as far)."""
    out = run_training(tmp_path / "run", tiny_pipeline_dir, pairs_parquet, **ACCUM)
    norm, weights = by_hand(tmp_path / "hand", tiny_pipeline_dir, pairs_parquet)
    row = logged(out)[0]
    assert row["pairs_seen"] == 4
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)
    trained = UNet2DConditionModel.from_pretrained(out / "final", subfolder="unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").state_dict()
    moved = max(float((trained[k] - base[k]).abs().max()) for k in base)
    assert 0.9e-3 < moved < 1.5e-3  # one AdamW step of lr 1e-3 (plus weight decay), not two
    for k, v in weights.items():  # float sums in another order: a few ulps of the gradient, x lr
        torch.testing.assert_close(trained[k], v, rtol=0, atol=1e-7, msg=k)


@pytest.mark.parametrize("max_norm", [0.5, 2.0, 1e6])
def test_clipping_equals_accelerates(max_norm):
    """The loop's clipping (no rescaling pass when nothing is clipped) returns and leaves what
    accelerate's `clip_grad_norm_` does, bit for bit, whether it clips or not."""
    from accelerate import Accelerator

    from xdpo.train.distributed import clip_grad_norm

    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 50, 7)]
    b = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 50, 7)]
    for p, q in zip(a, b, strict=True):
        p.grad = torch.randn(p.shape, generator=gen) * 0.2
        q.grad = p.grad.clone()
    accelerator = Accelerator(cpu=True)
    assert torch.equal(clip_grad_norm(accelerator, a, max_norm), accelerator.clip_grad_norm_(b, max_norm))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a, b, strict=True))


def test_lr_is_scheduled_per_optimizer_step(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """Warmup counts optimizer steps, not micro-batches: lr = base * step / warmup for steps 1..3."""
    out = run_training(
        tmp_path / "run", tiny_pipeline_dir, pairs_parquet,
        **{**ACCUM, "train.max_steps": 3, "train.warmup_steps": 4, "model.lora_rank": 4},
    )  # fmt: skip
    assert [r["lr"] for r in logged(out)] == pytest.approx([0.0, 0.25e-3, 0.5e-3])


def test_resume_with_accumulation_is_exact(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """2 steps of 2 micro-batches in one run, or 1 step then a resumed step: the same weights, bit for bit."""
    from safetensors.torch import load_file

    kw = {**ACCUM, "model.lora_rank": 4, "train.checkpoint_every": 1}
    fresh = run_training(tmp_path / "fresh", tiny_pipeline_dir, pairs_parquet, **{**kw, "train.max_steps": 2})
    run_training(tmp_path / "part", tiny_pipeline_dir, pairs_parquet, **kw)
    part = run_training(
        tmp_path / "part", tiny_pipeline_dir, pairs_parquet,
        **{**kw, "train.max_steps": 2, "train.resume_from": "latest"},
    )  # fmt: skip
    assert [r["loss"] for r in logged(fresh)] == [r["loss"] for r in logged(part)]
    a, b = (load_file(d / "checkpoints" / "step-2" / "adapter_model.safetensors") for d in (fresh, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_accumulation_on_two_processes_averages_every_micro_batch(
    tmp_path, tiny_pipeline_dir, pairs_parquet, mode
):
    """2 processes x 2 micro-batches over gloo (DDP, or FSDP2 as tests/test_fsdp.py forces it): the synced
    gradient is the mean over all 4 micro-batches."""
    from test_fsdp import FSDP_ENV

    out = tmp_path / mode
    args = train_overrides(out, tiny_pipeline_dir, pairs_parquet, **{**ACCUM, "train.batch_size": 1})
    log = torchrun("train", *args, env=FSDP_ENV if mode == "fsdp" else {})
    assert "effective batch 4 pairs" in log
    assert f"distributed: {'FSDP' if mode == 'fsdp' else 'MULTI_CPU'}, 2 process(es)" in log
    norm, _ = by_hand(tmp_path / "hand", tiny_pipeline_dir, pairs_parquet, world=2, **{"train.batch_size": 1})
    row = logged(out)[0]
    assert row["pairs_seen"] == 4 and math.isfinite(row["grad_norm"])
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)
