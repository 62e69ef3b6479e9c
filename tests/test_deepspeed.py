"""DeepSpeed ZeRO-2/3 on 2 CPU processes (gloo), through accelerate's DeepSpeed path as on GPUs (forced on
where accelerate falls back to plain multi-CPU): the step equals the step computed by hand, the parameters
are really partitioned, online rounds and the reference updates survive a resume, and `final/` loads."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import online_args, torchrun, train_overrides
from test_grad_accum import ACCUM, by_hand

try:  # in the dev extras; deepspeed builds its ops lazily (a C++ compiler for its CPU comm op)
    import deepspeed  # noqa: F401
except Exception as e:  # pragma: no cover - where deepspeed cannot be installed
    pytest.skip(f"deepspeed cannot be imported here: {e}", allow_module_level=True)


def ds_env(stage: int) -> dict[str, str]:
    """What `accelerate launch --config_file configs/accelerate/deepspeed-zero{stage}.yaml` exports."""
    return {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
        "ACCELERATE_GRADIENT_CLIPPING": "1.0",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false",
    }


def launch(stage: int, args: list[str], env: dict[str, str] | None = None) -> str:
    return torchrun("train", *args, env={**ds_env(stage), **(env or {})})


def logged(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_zero3_step_equals_the_step_by_hand(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """ZeRO-3, full fine-tune, 2 processes x 2 micro-batches: each process holds half of the parameters,
    the logged gradient norm is the mean gradient over all 4 micro-batches (fails if DeepSpeed's accumulation
    or clipping disagreed with train.grad_accum / train.max_grad_norm), and `final/` holds the weights after
    one AdamW step, from DeepSpeed's fp32 master weights."""
    kw = {**ACCUM, "train.batch_size": 1}
    out = tmp_path / "zero3"
    log = launch(3, train_overrides(out, tiny_pipeline_dir, pairs_parquet, **kw))
    assert "distributed: DEEPSPEED ZeRO-3, 2 process(es)" in log and "effective batch 4 pairs" in log
    for rank in (0, 1):
        line = next(x for x in log.splitlines() if f"ZeRO-3: process {rank} holds" in x)
        assert "(0.50)" in line, line
    assert "sharded: zero3 over 2 processes" in log  # the memory estimate divides what ZeRO-3 shards
    grads: dict = {}
    norm, weights = by_hand(tmp_path / "hand", tiny_pipeline_dir, pairs_parquet, world=2, grads=grads, **kw)
    row = logged(out)[0]
    assert row["pairs_seen"] == 4 and row["grad_norm"] == pytest.approx(norm, rel=1e-5)
    trained = UNet2DConditionModel.from_pretrained(out / "final", subfolder="unet").state_dict()
    # AdamW's first step moves a weight by lr * g / (|g| + eps): +-lr wherever the gradient is clear of float
    # noise. Gradients that are zero in exact arithmetic (here ~1e-8: a conv bias before a GroupNorm with one
    # channel per group) are noise whose sign depends on the order the 4 micro-batches are summed in.
    floor = 1e-5 * max(float(g.abs().max()) for g in grads.values())
    covered = 0
    for k, v in weights.items():
        clear = grads[k].abs() > floor
        covered += int(clear.sum())
        torch.testing.assert_close(
            trained[k][clear], v[clear], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )
        assert bool(((trained[k] - v).abs() <= 2.1e-3).all()), k  # elsewhere: one step of lr 1e-3 at most
    assert covered > 0.9 * sum(v.numel() for v in weights.values())


@pytest.mark.slow
def test_zero3_lora_online_rounds_and_reference_update_survive_resume(
    tmp_path, tiny_pipeline_dir, pairs_parquet
):
    """ZeRO-3 with LoRA on online rounds and the periodic reference: round 0 is sampled by the partitioned
    policy (under no_grad: ZeRO-3 gathers parameters in the sampling forwards, which inference mode would turn
    into tensors the training step cannot save for backward); the reference becomes the policy at step 2 (its
    adapter snapshot written into partitioned adapters for each reference pass); resumed from step 2, round 1
    is sampled and the loss of step 3 is exactly log 2 (reference = policy), so the snapshot and the policy
    were both restored; and the resumed run ends where an uninterrupted one does (the optimizer's partitioned
    moments and the round files restored too)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    extra, env = online_args(tmp_path)
    out = tmp_path / "lora"
    kw = {"model.lora_rank": 4, "train.checkpoint_every": 1, "reference.strategy": "periodic",
          "reference.update_every": 2, "reference.max_divergence": 10}  # fmt: skip
    launch(
        3,
        [*train_overrides(out, tiny_pipeline_dir, pairs_parquet, **kw, **{"train.max_steps": 2}), *extra],
        env,
    )
    ckpt = out / "checkpoints" / "step-2"
    assert (ckpt / "pytorch_model").is_dir() and (ckpt / "reference.safetensors").is_file()
    args = train_overrides(out, tiny_pipeline_dir, pairs_parquet, **kw, **{"train.resume_from": "latest"})
    assert "Resuming from" in launch(3, [*args, *extra], env)
    rows = logged(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["ref_updates"] == 1
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) != rows[1]["loss"]
    assert rows[2]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert sorted(p.name for p in (out / "online").iterdir()) == ["round-0000", "round-0001"]
    straight = tmp_path / "straight"
    args = train_overrides(straight, tiny_pipeline_dir, pairs_parquet, **kw, **{"train.max_steps": 3})
    launch(3, [*args, *extra], env)
    assert logged(straight)[2]["grad_norm"] == pytest.approx(rows[2]["grad_norm"], rel=1e-6)
    a, b = (load_file(d / "final" / "pytorch_lora_weights.safetensors") for d in (out, straight))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_lora_weights(out / "final")
    image = pipe("a picture", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


@pytest.mark.slow
def test_zero2_bf16_ema_reference(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """ZeRO-2 in bf16 (a bf16 model under autocast, fp32 master weights) with the EMA reference: after
    step 1 the saved reference is decay * base + (1 - decay) * the bf16 policy; `final/` is the fp32 master."""
    from safetensors.torch import load_file

    from xdpo.config import load_config
    from xdpo.train.checkpoint import deepspeed_weights

    out = tmp_path / "ema"
    kw = {"train.max_steps": 2, "train.checkpoint_every": 1, "train.mixed_precision": "bf16",
          "reference.strategy": "ema", "reference.update_every": 1}  # fmt: skip
    args = train_overrides(out, tiny_pipeline_dir, pairs_parquet, **kw)
    log = launch(2, args)
    assert "distributed: DEEPSPEED ZeRO-2, 2 process(es)" in log
    rows = logged(out)
    assert [r["ref_updates"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    decay = load_config(None, args).reference.ema_decay
    ckpt = out / "checkpoints" / "step-1"
    policy, ref = deepspeed_weights(ckpt), load_file(ckpt / "reference.safetensors")
    base = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet").state_dict()
    for k, v in base.items():  # within one bf16 step of the policy's value (DeepSpeed's own rounding)
        expected = v.float().lerp(policy[k].bfloat16().float(), 1 - decay)
        tol = (1 - decay) * policy[k].abs() * 2**-7 + 1e-7
        assert bool(((ref[k] - expected).abs() <= tol).all()), k
    moved = [not torch.equal(policy[k], base[k]) for k in base]
    assert any(moved)
    final = UNet2DConditionModel.from_pretrained(out / "final", subfolder="unet").state_dict()
    last = deepspeed_weights(out / "checkpoints" / "step-2")
    assert all(torch.equal(final[k], last[k].float()) for k in final)


class _Plugin:
    def __init__(self, stage: int, config: dict) -> None:
        self.zero_stage, self.deepspeed_config = stage, config
        self.gradient_clipping = self.gradient_accumulation_steps = None


class _Accelerator:
    def __init__(self, plugin: _Plugin) -> None:
        self.state = type("State", (), {"deepspeed_plugin": plugin})()
        self.printed: list[str] = []

    def print(self, text: str) -> None:
        self.printed.append(text)


def test_deepspeed_config_follows_the_xdpo_config():
    """Micro-batch, accumulation and clipping come from the xdpo config (a disagreeing DeepSpeed value is
    overridden and said so); stage 0 and a DeepSpeed optimizer section are refused with one line."""
    from xdpo.config import load_config
    from xdpo.errors import XdpoError
    from xdpo.train.distributed import configure_deepspeed

    cfg = load_config(None, ["model.pretrained=x", "data.path=x", "train.batch_size=3", "train.grad_accum=4",
                             "train.max_grad_norm=0.5"])  # fmt: skip
    ds = {"gradient_clipping": 1.0, "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
          "zero_optimization": {"stage": 2}}  # fmt: skip
    acc = _Accelerator(_Plugin(2, ds))
    configure_deepspeed(acc, cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and "train_batch_size" not in ds
    assert acc.printed == ["DeepSpeed config gradient_clipping=1.0 ignored: the xdpo config sets 0.5"]
    with pytest.raises(XdpoError, match="stage 0 is plain data parallelism"):
        configure_deepspeed(_Accelerator(_Plugin(0, {})), cfg)
    with pytest.raises(XdpoError, match="remove its `optimizer`"):
        configure_deepspeed(_Accelerator(_Plugin(3, {"optimizer": {"type": "AdamW"}})), cfg)


@pytest.mark.slow
def test_zero3_lora_grpo_recomputes_the_recorded_log_probs(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """ZeRO-3 with LoRA, GRPO with CFG: the round's stochastic steps are sampled by the partitioned policy and
    their log-probs recomputed by the training step on the same weights (ratio 1 at the first update); the
    KL to the reference (adapters off) is 0 there and grows after the update."""
    extra, env = online_args(tmp_path)
    out = tmp_path / "grpo"
    kw = {"model.lora_rank": 4, "loss.objective": "grpo", "online.guidance": 3.0, "train.max_steps": 2,
          "train.learning_rate": 1e-3}  # fmt: skip
    launch(3, [*train_overrides(out, tiny_pipeline_dir, pairs_parquet, **kw), *extra], env)
    rows = logged(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["ratio_at_start"] < 1e-4
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-12) and rows[1]["kl"] > 0
