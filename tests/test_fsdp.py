"""FSDP2 on 2 CPU processes (gloo), through accelerate's FSDP plugin as on GPUs: the parameters are really
sharded, full fine-tune and LoRA (with the periodic reference; LoRA on online rounds) train, resume, and write
a final/ that loads."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import online_args, torchrun

FSDP_ENV = {  # what `accelerate launch --config_file configs/accelerate/fsdp.yaml` exports
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
}


def launch(out, pipe, pairs, *extra, env=None):
    args = [
        f"model.pretrained={pipe}", f"data.path={pairs}", "data.resolution=32", f"output_dir={out}",
        "train.batch_size=2", "train.learning_rate=1e-3", "train.scale_lr=false", "train.warmup_steps=0",
        "train.checkpoint_every=1", "loss.beta=100", "reference.strategy=periodic", "reference.update_every=2",
        "reference.max_divergence=10", *extra,
    ]  # fmt: skip
    return torchrun("train", *args, env={**FSDP_ENV, **(env or {})})


def steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [0, 4])
def test_fsdp_two_processes_shard_train_resume_and_save(tmp_path, tiny_pipeline_dir, pairs_parquet, lora):
    """LoRA trains on online rounds: round 0 sampled by the sharded policy before step 1, the reference updated
    at step 2, round 1 sampled by the resumed policy (each round under no_grad: FSDP gathers parameters in
    the sampling forwards, which inference mode would turn into tensors the next step cannot use)."""
    from diffusers import StableDiffusionPipeline

    extra, env = online_args(tmp_path) if lora else ([], None)
    out = tmp_path / "fsdp"
    log = launch(out, tiny_pipeline_dir, pairs_parquet, "train.max_steps=2", f"model.lora_rank={lora}", *extra,
                 env=env)  # fmt: skip
    assert "distributed: FSDP, 2 process(es)" in log
    for rank in (0, 1):  # each process holds half of the denoiser's parameters
        line = next(x for x in log.splitlines() if f"FSDP: process {rank} holds" in x)
        assert "(0.50)" in line, line
    ckpt = out / "checkpoints" / "step-2"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()
    log = launch(out, tiny_pipeline_dir, pairs_parquet, "train.max_steps=3", f"model.lora_rank={lora}",
                 "train.resume_from=latest", *extra, env=env)  # fmt: skip
    assert "Resuming from" in log and steps(out) == [1, 2, 3]
    if lora:
        assert sorted(p.name for p in (out / "online").iterdir()) == ["round-0000", "round-0001"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["ref_updates"] == 1 and rows[1]["ref_divergence"] is not None
    if lora:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
        pipe.load_lora_weights(out / "final")
    else:
        pipe = StableDiffusionPipeline.from_pretrained(out / "final", safety_checker=None)
        base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
        moved = [
            not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), base.unet.parameters(), strict=True)
        ]
        assert any(moved)
    image = pipe("a picture", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
