"""SePPO (Zhang et al. 2024, arXiv 2410.05255v1): the loss and the anchor criterion against an independent
transcription of Eqs. 7-8, the reference samples drawn by the selected checkpoint, the pool's draws, a tiny
run, and a resume that keeps the candidate references."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_training
from xdpo.config import load_config
from xdpo.errors import ConfigError
from xdpo.objectives import LossInput, get_objective
from xdpo.objectives.seppo import aaf_flip, seppo_loss


def transcribed(e_w, e_l, r_w, r_l, beta, lam=1.0, indicator=False):
    """Eq. 7 with Eq. 8's flip, one pair, written from the paper: x = ||eps - eps_ref(x^w)||^2 -
    ||eps - eps_theta(x^w)||^2, s = sign(x) (or 1(x > 0)); loss = -log sigma(-(beta/2) lam [(e_w - r_w) -
    s (e_l - r_l)]) (xdpo writes Diffusion-DPO's beta T omega as beta/2 times lambda, docs/math.md §3)."""
    x = r_w - e_w
    s = (1.0 if x > 0 else 0.0) if indicator else (1.0 if x > 0 else -1.0 if x < 0 else 0.0)
    z = -(beta / 2) * lam * ((e_w - r_w) - s * (e_l - r_l))
    return math.log1p(math.exp(-z)), s


CASES = [  # e_theta(w), e_theta(ref sample), e_ref(w), e_ref(ref sample)
    (0.10, 0.30, 0.12, 0.25),  # policy better on the anchor: the reference sample is a loser
    (0.15, 0.30, 0.12, 0.25),  # reference better on the anchor: the reference sample is a second winner
    (0.12, 0.20, 0.12, 0.40),  # a tie on the anchor: skipped (sign 0)
]


@pytest.mark.parametrize("indicator", [False, True])
def test_loss_and_flip_equal_the_transcription(indicator):
    e_w, e_l, r_w, r_l = (torch.tensor(c, dtype=torch.float64) for c in zip(*CASES, strict=True))
    lam = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    flipper = "indicator" if indicator else "sign"
    out, s = seppo_loss(e_w, e_l, r_w, r_l, beta=40.0, flipper=flipper, weight=lam)
    for i, case in enumerate(CASES):
        want, want_s = transcribed(*case, beta=40.0, lam=float(lam[i]), indicator=indicator)
        assert out.loss[i].item() == pytest.approx(want, rel=1e-12)
        assert s[i].item() == want_s
    assert torch.equal(aaf_flip(e_w, r_w, flipper), s)
    assert torch.allclose(out.reward_w - out.reward_l, -20.0 * lam * ((e_w - r_w) - s * (e_l - r_l)))


def test_the_record_counts_losers_winners_and_skips():
    seppo = get_objective("seppo")
    e_w, e_l, r_w, r_l = (torch.tensor(c) for c in zip(*CASES, strict=True))
    inp = LossInput(err=torch.cat([e_w, e_l]), ref=torch.cat([r_w, r_l]), pairs=True)
    out = seppo.loss(inp, beta=10.0, outer="sigmoid", label_smoothing=0.0, flipper="sign", select="random")
    assert {k: int(v.sum()) for k, v in out.counts.items()} == {
        "aaf_loser": 1,
        "aaf_winner": 1,
        "aaf_skipped": 1,
    }


def test_a_flipped_sample_is_learned_as_a_winner():
    """s = -1: the gradient lowers the policy's error on the reference sample too (both terms pushed down)."""
    e = torch.tensor([0.15, 0.30], requires_grad=True)
    out, s = seppo_loss(e[:1], e[1:], torch.tensor([0.12]), torch.tensor([0.25]), beta=10.0)
    out.loss.sum().backward()
    assert s.item() == -1 and e.grad[0] > 0 and e.grad[1] > 0


def test_config_refuses_what_seppo_cannot_do():
    base = ["model.pretrained=m", "data.path=d", "loss.objective=seppo", "reference.strategy=checkpoints"]
    cfg = load_config(None, base + ["seppo.select=latest", "seppo.steps=4"])
    assert cfg.seppo.select == "latest" and cfg.seppo.steps == 4
    with pytest.raises(ConfigError, match="reference.strategy"):
        load_config(None, base[:3])
    with pytest.raises(ConfigError, match="loss.divergence"):
        load_config(None, [*base, "loss.divergence=chi2"])
    with pytest.raises(ConfigError, match="seppo.select"):
        load_config(None, [*base, "seppo.select=best"])
    with pytest.raises(ConfigError, match="reference.strategy"):
        load_config(None, ["model.pretrained=m", "data.path=d", "reference.strategy=checkpoints"])


class _Reference:
    """A stand-in reference: `sampling()` hands out the denoiser `model()` returns now."""

    def __init__(self, model):
        self.model = model

    def sampling(self):
        from contextlib import nullcontext

        return nullcontext(self.model if isinstance(self.model, torch.nn.Module) else self.model())


class Painter(torch.nn.Module):
    """A denoiser whose pipeline paints every latent with `value`."""

    def __init__(self, value):
        super().__init__()
        self.value = value


@pytest.fixture
def fake_pipeline(monkeypatch):
    """The family's pipeline replaced by one that returns latents full of its denoiser's `value` (through the
    rollout engine's step-end callback); returns the list of its calls."""
    from types import SimpleNamespace

    from xdpo.rollout import reference_samples

    calls = []

    class Pipe:
        def __init__(self, model):
            self.model = model

        def set_progress_bar_config(self, **kw):
            pass

        def __call__(self, prompt, generator, num_inference_steps, guidance_scale, output_type,
                     callback_on_step_end, callback_on_step_end_tensor_inputs, **size):  # fmt: skip
            calls.append((list(prompt), num_inference_steps, guidance_scale, size))
            lat = torch.full((len(prompt), 4, 2, 2), float(self.model.value))
            callback_on_step_end(self, 0, torch.tensor(1.0), {"latents": lat})
            return SimpleNamespace(images=[None] * len(prompt))

    monkeypatch.setattr(reference_samples, "pipeline_with", lambda comps, model, scheduler: Pipe(model))
    monkeypatch.setattr("xdpo.models.families.family_of_pipeline", lambda pipe: None)
    monkeypatch.setattr("xdpo.evaluate.pipeline.sampling_defaults", lambda m: {"steps": 9, "guidance": 3.0,
                                                                             "scheduler": "default"})  # fmt: skip
    return calls


def _sampler(reference):
    from xdpo.rollout.reference_samples import ReferenceSampler

    cfg = load_config(None, ["model.pretrained=m", "data.path=d", "loss.objective=seppo", "data.resolution=16",
                             "reference.strategy=checkpoints", "seppo.steps=2", "seppo.batch_images=2"])  # fmt: skip
    return ReferenceSampler(cfg, None, reference)


def test_the_sampler_draws_with_the_references_denoiser(fake_pipeline):
    """The sampler draws with the denoiser the reference hands out (swapped in: one that paints a known
    image), at the section's settings, batched, and returns the pipeline's clean latents."""
    sampler = _sampler(_Reference(Painter(7.0)))
    lat = sampler(["a", "b", "c"], [1, 2, 3])
    assert lat.shape == (3, 4, 2, 2) and bool((lat == 7.0).all())
    sampler.reference = _Reference(Painter(3.0))  # another denoiser: its samples, not the cached pipe's
    assert bool((sampler(["d"], [4]) == 3.0).all())
    assert fake_pipeline == [
        (["a", "b"], 2, 3.0, {"height": 16, "width": 16}),
        (["c"], 2, 3.0, {"height": 16, "width": 16}),
        (["d"], 2, 3.0, {"height": 16, "width": 16}),
    ]


def test_the_pool_draws_and_swaps_candidates(tmp_path, fake_pipeline):
    """Checkpoints: candidates saved every save_every steps (at most keep), a draw per resample_every; the
    reference storage holds the drawn candidate's weights exactly (LoRA-like snapshot storage)."""
    from types import SimpleNamespace

    from xdpo.train.reference.checkpoints import Checkpoints, candidate_path, draw

    class Storage:  # the AdapterStorage protocol on a dict of weights
        def __init__(self):
            self.policy, self.snapshot = {"w": torch.zeros(2)}, None

        def backup(self):
            return None if self.snapshot is None else dict(self.snapshot)

        def restore(self, saved):
            self.snapshot = saved

        def blend(self, weight):
            self.snapshot = {k: v.clone() for k, v in self.policy.items()}

        def tensors(self):
            return {} if self.snapshot is None else self.snapshot

        def load(self, tensors):
            self.snapshot = dict(tensors) or None

        def reset(self):
            self.snapshot = None

    cfg = SimpleNamespace(loss=SimpleNamespace(objective="seppo"), output_dir=str(tmp_path),
                          seppo=SimpleNamespace(select="latest", save_every=2, keep=2, resample_every=1))  # fmt: skip
    strat, store = Checkpoints(SimpleNamespace()), Storage()
    strat.bind(cfg)
    check = SimpleNamespace(seed=0)
    for step in range(1, 7):
        store.policy["w"] = torch.full((2,), float(step))
        if strat.due(step):
            strat.update(step, store, check)
    assert (
        strat.pool == [0, 4, 6]
        and strat.current == 6
        and torch.equal(store.snapshot["w"], torch.full((2,), 6.0))
    )
    assert candidate_path(tmp_path, 2).is_file()  # written once, dropped from the pool only
    painter = Painter(0.0)

    def drawn():  # the reference's denoiser paints its weights' value (0: the initial model)
        painter.value = 0.0 if store.snapshot is None else float(store.snapshot["w"][0])
        return painter

    sampler = _sampler(_Reference(drawn))
    assert bool((sampler(["a"], [0]) == 6.0).all())  # the selected checkpoint's samples
    strat.use(4, store)  # another candidate, read back from its file
    assert bool((sampler(["a"], [0]) == 4.0).all())
    strat.select = "initial"
    strat.update(8, store, check)
    assert store.snapshot is None and strat.current == 0
    draws = {draw("random", [0, 4, 6], seed=0, step=s) for s in range(50)}
    assert draws == {0, 4, 6} and draw("random", [0, 4, 6], 0, 9) == draw("random", [0, 4, 6], 0, 9)


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


SEPPO_RUN = {"loss.objective": "seppo", "reference.strategy": "checkpoints", "seppo.steps": 2,
             "seppo.save_every": 1, "seppo.keep": 2, "seppo.select": "random", "seppo.guidance": 1.0}  # fmt: skip


def test_a_tiny_run_trains_and_logs_the_flipper(tmp_path, tiny_pipeline_dir, pairs_parquet):
    out = run_training(tmp_path / "run", tiny_pipeline_dir, pairs_parquet, **SEPPO_RUN)
    rows = _rows(out)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["aaf_loser"] + r["aaf_winner"] + r["aaf_skipped"] == 2 for r in rows)
    assert rows[-1]["ref_candidates"] == 3  # the initial model and the last two checkpoints
    assert sorted(p.name for p in (out / "reference-candidates").iterdir())[:1] == [
        "step-0000001.safetensors"
    ]


def test_a_winner_only_table_trains_through_a_column_mapping(
    tmp_path, tiny_pipeline_dir, pairs_parquet, capsys
):
    """A table of preferred images and captions only (no label, its own column names), read as
    data.format=images with data.columns: every image is a winner, each step's losers are sampled."""
    import pyarrow.parquet as pq

    t = pq.read_table(pairs_parquet)
    rows = [(c, a if lab == 1.0 else b) for c, a, b, lab in zip(*(t.column(n).to_pylist() for n in
            ("caption", "jpg_0", "jpg_1", "label_0")), strict=True) if lab != 0.5]  # fmt: skip
    table = __import__("pyarrow").table({"chosen": [r[1] for r in rows], "prompt": [r[0] for r in rows]})
    pq.write_table(table, tmp_path / "winners.parquet")
    kw = {
        **SEPPO_RUN,
        "data.format": "images",
        "data.columns": "image:chosen,caption:prompt",
        "train.max_steps": 2,
    }
    out = run_training(tmp_path / "run", tiny_pipeline_dir, tmp_path / "winners.parquet", **kw)
    rows = _rows(out)
    assert len(rows) == 2 and all(r["aaf_loser"] + r["aaf_winner"] + r["aaf_skipped"] == 2 for r in rows)
    assert "has no `label` column: every image is taken as preferred" in capsys.readouterr().out


def test_resume_keeps_the_candidate_references(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """A run stopped at step 2 and resumed to 4 logs what an uninterrupted run logs (pool, draws, losses)."""
    kw = {**SEPPO_RUN, "train.max_steps": 4, "train.checkpoint_every": 2}
    whole = _rows(run_training(tmp_path / "whole", tiny_pipeline_dir, pairs_parquet, **kw))
    run_training(tmp_path / "split", tiny_pipeline_dir, pairs_parquet, **{**kw, "train.max_steps": 2})
    split = _rows(run_training(tmp_path / "split", tiny_pipeline_dir, pairs_parquet,
                               **{**kw, "train.resume_from": "latest"}))  # fmt: skip
    assert len(split) == 4
    for a, b in zip(whole, split, strict=True):
        assert (a["ref_checkpoint"], a["ref_candidates"], a["aaf_loser"]) == (
            b["ref_checkpoint"],
            b["ref_candidates"],
            b["aaf_loser"],
        )
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_flow_family_with_lora_trains(tmp_path, tiny_sd3_pipeline_dir, pairs_parquet):
    """SD3 (flow matching) with LoRA: the reference is an adapter snapshot swapped into the policy to sample."""
    kw = {**SEPPO_RUN, "model.lora_rank": 4, "train.max_steps": 2}
    rows = _rows(run_training(tmp_path / "run", tiny_sd3_pipeline_dir, pairs_parquet, **kw))
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["ref_candidates"] == 3


def test_sampled_latents_are_the_denoisers_layout():
    """The rollout engine's last-step latents of the packed 2025 families, unpacked by the family, are the
    latents their pipelines' own helpers give (FLUX.2: `_unpack_latents_with_ids`; Qwen-Image: packing)."""
    from types import SimpleNamespace

    from diffusers import Flux2Pipeline, QwenImagePipeline

    from xdpo.models.families import flux2, qwenimage, zimage

    x = torch.randn(2, 16, 4, 6)
    tokens = Flux2Pipeline._pack_latents(x)
    ids = Flux2Pipeline._prepare_latent_ids(x)
    got = flux2.sampled_latents(SimpleNamespace(vae_scale_factor=8), tokens, 4 * 16, 6 * 16)
    assert torch.equal(got, Flux2Pipeline._unpack_latents_with_ids(tokens, ids))

    class Qwen:
        vae_scale_factor = 8
        _unpack_latents = staticmethod(QwenImagePipeline._unpack_latents)

    y = torch.randn(2, 4, 8, 12)
    assert torch.equal(qwenimage.sampled_latents(Qwen(), qwenimage.pack(y), 8 * 8, 12 * 8), y)
    assert zimage.sampled_latents(None, y, 64, 96) is y
