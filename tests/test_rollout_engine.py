"""The rollout engine: its images (and the latents they were decoded from) are the family pipeline's own at the
same seeds whatever the batching, with CFG on and off; the timestep grid and the flow DPM-Solver; whole groups
per process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xdpo.evaluate.pipeline import load_pipeline
from xdpo.rollout.engine import Job, RolloutEngine, set_scheduler
from xdpo.rollout.groups import calls_per_process, my_groups, plan_round

CASES = {  # fixture: (scheduler, guidance): CFG on for the UNet, off for SD3, Flux's guidance embedding
    "tiny_pipeline_dir": ("ddim", 5.0),
    "tiny_sd3_pipeline_dir": ("default", 1.0),
    "tiny_flux_pipeline_dir": ("default", 3.5),
}
SLOW = {"tiny_flux_pipeline_dir"}  # T5 at 512 tokens: ~40 s on a shared core


@pytest.mark.parametrize(
    "fixture", [pytest.param(f, marks=[pytest.mark.slow] if f in SLOW else []) for f in CASES]
)
def test_engine_images_and_latents_are_the_pipelines_own_at_the_same_seeds(request, fixture):
    scheduler, guidance = CASES[fixture]
    pipe = load_pipeline(request.getfixturevalue(fixture), scheduler=scheduler, device="cpu", dtype="fp32")
    jobs = [Job("a red square", 3), Job("a blue circle", 7), Job("a red square", 11)]
    got = RolloutEngine(pipe, steps=3, guidance=guidance, batch_images=2).sample(jobs)
    assert len(got.images) == 3 and got.latents.shape[0] == 3 and got.calls == 2 and len(got.grid) == 3
    for j, image, latent in zip(jobs, got.images, got.latents, strict=True):
        kw = {"prompt": [j.prompt], "num_inference_steps": 3, "guidance_scale": guidance}
        with torch.inference_mode():
            own = pipe(generator=[torch.Generator().manual_seed(j.seed)], **kw).images[0]
            lat = pipe(generator=[torch.Generator().manual_seed(j.seed)], output_type="latent", **kw).images
        if lat.ndim == 3:  # Flux's packed latents, unpacked as its pipeline does before decoding
            w, h = own.size
            lat = type(pipe)._unpack_latents(lat, h, w, pipe.vae_scale_factor)
        assert (
            np.abs(np.asarray(own, dtype=int) - np.asarray(image, dtype=int)).max() <= 1
        )  # batched: uint8 +-1
        torch.testing.assert_close(latent, lat[0].float(), rtol=1e-4, atol=1e-5)
    alone = RolloutEngine(pipe, steps=3, guidance=guidance, batch_images=1).sample(jobs[:1])
    with torch.inference_mode():
        own = pipe(prompt=[jobs[0].prompt], generator=[torch.Generator().manual_seed(3)], num_inference_steps=3,
                   guidance_scale=guidance).images[0]  # fmt: skip
    assert np.array_equal(
        np.asarray(own), np.asarray(alone.images[0])
    )  # one image a call: exactly the pipeline's


def test_flow_dpm_solver_and_the_grid(tiny_sd3_pipeline_dir):
    pipe = load_pipeline(tiny_sd3_pipeline_dir, scheduler="default", device="cpu", dtype="fp32")
    euler = RolloutEngine(pipe, steps=4, guidance=1.0).sample([Job("a", 0)])
    assert euler.grid == [float(t) for t in pipe.scheduler.timesteps] and euler.grid[0] == 1000.0
    set_scheduler(pipe, "dpm++")
    assert (
        type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
        and pipe.scheduler.config.use_flow_sigmas
    )
    dpm = RolloutEngine(pipe, steps=4, guidance=1.0).sample([Job("a", 0)])
    assert len(dpm.grid) == 4 and not torch.equal(dpm.latents, euler.latents)
    with pytest.raises(Exception, match="default or dpm"):
        set_scheduler(
            load_pipeline(tiny_sd3_pipeline_dir, scheduler="default", device="cpu", dtype="fp32"), "ddim"
        )


def test_groups_are_dealt_whole_and_calls_padded_to_the_busiest_process():
    assert [my_groups(5, r, 2) for r in (0, 1)] == [[0, 2, 4], [1, 3]]
    assert calls_per_process(5, 4, 2, 8) == 2  # process 0: 12 images in calls of 8
    plan = plan_round(
        [{"prompt": p} for p in "abcdef"], 3, 100, first_index=10, prompts_per_round=4, choose_seed=1
    )
    assert (
        plan.n_groups == 4
        and len(set(plan.prompt_index)) == 4
        and list(plan.prompt_index) == sorted(plan.prompt_index)
    )
    jobs = plan.jobs([1])
    assert [j.seed for j in jobs] == [100 + plan.prompt_index[1] * 3 + k for k in range(3)]
    assert [j.index for j in jobs] == [3, 4, 5] and {j.group for j in jobs} == {1}
