"""Every shipped config trains at the learning rate of the launcher or paper it cites (docs/math.md §8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from xdpo.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "xdpo" / "configs"

# config -> (processes in the source's run, effective learning rate the optimizer must see)
PAPER_LR = {
    # Diffusion-DPO launchers/sd15.sh and sdxl.sh: --learning_rate=1e-8 --scale_lr, 1 x 128 x 16 GPUs
    "sd15-pickapic-dpo.yaml": (16, 1e-8 * 2048),
    "sdxl-pickapic-dpo.yaml": (16, 1e-8 * 2048),
    # Kang et al.: lr 1e-8 in Diffusion-DPO's recipe (batch 2048, scaled)
    "sd15-pickapic-dpo-refupdate.yaml": (16, 1e-8 * 2048),
    # xDPO Sec. 5.2: 1e-8 in Diffusion-DPO's pipeline, 1 x 128 accumulation x 2 GPUs = 256 -> 2.56e-6
    "sd15-pickapic-xdpo.yaml": (2, 2.56e-6),
    # xDPO carried to SDXL in Diffusion-DPO's SDXL recipe (batch 2048, scaled)
    "sdxl-pickapic-xdpo.yaml": (16, 1e-8 * 2048),
    # Diffusion-KTO exps/example.sh: --learning_rate=1e-07 without --scale_lr
    "sd15-pickapic-kto.yaml": (16, 1e-7),
    # Flow-DPO (Liu et al. 2025): lr 5e-6 at batch 64, not scaled
    "sd35-flowdpo-lora.yaml": (8, 5e-6),
    "flux-dev-dpo-lora.yaml": (8, 5e-6),
    # SePPO (arXiv 2410.05255v1): 8 GPUs x 256 accumulation = 2048; it states no lr: Diffusion-DPO's, scaled
    "sd15-pickapic-seppo.yaml": (8, 1e-8 * 2048),
    # MaPO's released code (mapo-t2i/mapo README): 1e-5 constant at batch 8 x 2 per GPU, not scaled
    "sdxl-pickapic-mapo.yaml": (8, 1e-5),
    # DiffusionNFT (App. C), AWM and DGPO (their codes' config/base.py): AdamW 3e-4, not scaled; FLUX: the same
    **{f"{m}-{o}-lora.yaml": (8, 3e-4) for m in ("sd35", "flux-dev") for o in ("nft", "awm", "dgpo")},
    # Flow-GRPO (config/base.py): AdamW 3e-4, not scaled
    "sd35-grpo-lora.yaml": (8, 3e-4),
    # Flow-DPO's LoRA recipe on the 2025 families (lr 5e-6 at batch 64, not scaled); full fine-tunes at 1e-6 (ours)
    "qwenimage-flowdpo-lora.yaml": (8, 5e-6),
    "flux2-dev-flowdpo-lora.yaml": (8, 5e-6),
    "flux2-klein-flowdpo-lora.yaml": (8, 5e-6),
    "flux2-klein-flowdpo-full.yaml": (8, 1e-6),
    "zimage-flowdpo-lora.yaml": (8, 5e-6),
    "zimage-flowdpo-full.yaml": (8, 1e-6),
    "wan21-t2v-flowdpo-lora.yaml": (8, 5e-6),
    "wan21-t2v-flowdpo-full.yaml": (8, 1e-6),
}
RECENT = {  # config -> its family (the hub checkpoint's pipeline class)
    "qwenimage-flowdpo-lora.yaml": "qwenimage",
    "flux2-dev-flowdpo-lora.yaml": "flux2",
    "flux2-klein-flowdpo-lora.yaml": "flux2_klein",
    "flux2-klein-flowdpo-full.yaml": "flux2_klein",
    "zimage-flowdpo-lora.yaml": "zimage",
    "zimage-flowdpo-full.yaml": "zimage",
    "wan21-t2v-flowdpo-lora.yaml": "wan",
    "wan21-t2v-flowdpo-full.yaml": "wan",
}
# the digits world's own: chosen by benchmarks/digits_sweep.py at batch 16 on one process, unscaled
DIGITS_LR = 3e-5
# digits-flow's (the flow base; `benchmarks/digits_sweep.py --model digits-flow`, see the configs' header):
# the UNet world's lr, beta 10 (the UNet world's 300 barely moved the flow base in 120 steps)
DIGITS_FLOW = {
    "digits-flow-dpo.yaml",
    "digits-flow-xdpo.yaml",
    "digits-flow-xdpo-eq9.yaml",
    "digits-flow-sft.yaml",
    "digits-flow-seppo.yaml",
}
DIGITS_FLOW_LR, DIGITS_FLOW_BETA = 3e-5, 10.0


def effective_lr(path: Path, world: int) -> float:
    """What the training loop gives the optimizer: lr x batch_size x grad_accum x processes if scale_lr."""
    t = load_config(path, ["data.path=x"]).train
    return t.learning_rate * (t.batch_size * t.grad_accum * world if t.scale_lr else 1)


def test_every_shipped_config_is_checked():
    papers = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("digits-"))
    assert papers == sorted(PAPER_LR)


@pytest.mark.parametrize("name", sorted(PAPER_LR))
def test_paper_config_effective_learning_rate(name):
    world, lr = PAPER_LR[name]
    assert effective_lr(CONFIGS / name, world) == pytest.approx(lr, rel=1e-9)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("digits-*.yaml")), ids=lambda p: p.name)
def test_digits_config_effective_learning_rate(path):
    assert effective_lr(path, 1) == pytest.approx(DIGITS_LR)


@pytest.mark.parametrize("name", sorted(DIGITS_FLOW))
def test_digits_flow_config(name):
    assert sorted(p.name for p in CONFIGS.glob("digits-flow-*.yaml")) == sorted(DIGITS_FLOW)
    cfg = load_config(CONFIGS / name, ["data.path=x"])
    assert effective_lr(CONFIGS / name, 1) == pytest.approx(DIGITS_FLOW_LR)
    assert cfg.loss.beta == DIGITS_FLOW_BETA and cfg.model.pretrained == "digits-flow"
    assert cfg.loss.beta_schedule == "constant" and cfg.timesteps.sampling == "logit_normal"  # Flow-DPO, SD3


def test_xdpo_is_not_trained_256x_slower_than_its_baseline():
    xdpo = effective_lr(CONFIGS / "sd15-pickapic-xdpo.yaml", 2)
    assert xdpo == pytest.approx(2.56e-6) and xdpo > 100 * 1e-8


@pytest.mark.parametrize("objective", ["nft", "awm", "dgpo"])
def test_online_configs_make_one_optimizer_step_a_round(objective):
    """The three codes take one optimizer step per epoch over every (image or group, grid step) item."""
    for model in ("sd35", "flux-dev"):
        cfg = load_config(CONFIGS / f"{model}-{objective}-lora.yaml")
        o, t = cfg.online, cfg.train
        steps = {"nft": int(o.sample_steps * cfg.nft.train_fraction), "awm": 6, "dgpo": 4}[objective]
        units = o.prompts_per_round * (1 if objective == "dgpo" else o.per_prompt)
        assert (
            o.enabled
            and o.every == 1
            and cfg.reference.strategy == "soft"
            and cfg.reference.update_every == 1
        )
        assert t.batch_size * t.grad_accum * 8 == units * steps


@pytest.mark.parametrize("name", sorted(RECENT))
def test_recent_family_configs_fit_their_family(name):
    """Flow-DPO's beta and loss on every new family; LoRA r 64 / alpha 128 or a frozen full-copy reference; the
    resolution on the family's patch grid behind an 8x VAE; clips of 4k + 1 frames for Wan only."""
    from xdpo.models.families import get_family

    cfg = load_config(CONFIGS / name, ["data.path=x"])
    fam = get_family(RECENT[name])
    assert (
        cfg.loss.beta == 500
        and cfg.loss.beta_schedule == "constant"
        and cfg.timesteps.sampling == "logit_normal"
    )
    lora = name.endswith("-lora.yaml")
    assert (cfg.model.lora_rank, cfg.model.lora_alpha) == ((64, 128) if lora else (0, None))
    assert lora or cfg.reference.strategy == "frozen"
    fam.check_resolution(cfg.data.resolution, 8)
    fam.check_frames(cfg.data.num_frames, 4)
    assert (cfg.data.num_frames > 0) == fam.video


def test_the_grpo_configs_take_two_updates_a_round_over_every_recorded_step():
    """Flow-GRPO updates twice per epoch over every (image, trained step) item of it."""
    for name, world in (("sd35-grpo-lora.yaml", 8), ("digits-grpo.yaml", 1)):
        cfg = load_config(CONFIGS / name, ["online.prompts=p.txt"])
        o, t = cfg.online, cfg.train
        items = o.prompts_per_round * o.per_prompt * int(o.sample_steps * cfg.grpo.train_fraction)
        assert o.every == 2 and items == 2 * t.batch_size * t.grad_accum * world, name
