"""MaPO (Hong et al., AAAI-26): the loss against an independent transcription of the paper's and the code's
forms, its gradient's direction, and a digits run that makes no reference and runs none."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import run_training
from xdpo.config import load_config
from xdpo.objectives import LossInput, get_objective
from xdpo.objectives.mapo import mapo_loss


def transcribed(e_w: float, e_l: float, s: float, lam: float, kappa: float) -> float:
    """e_w + lam * (-log sigma(kappa [phi(e_w) - phi(e_l)])), phi(l) = s l / (exp(s l) - 1) (Eqs. 9-11)."""

    def phi(loss: float) -> float:
        return s * loss / (math.exp(s * loss) - 1)

    x = kappa * (phi(e_w) - phi(e_l))
    return e_w + lam * math.log1p(math.exp(-x))


@pytest.mark.parametrize(
    ("s", "lam", "kappa", "expected"),
    [
        (0.5, 0.1, 1000.0, 0.1007357583718979),  # the released code's defaults
        (8.0, 1 / 8, 1.0, 0.1831239256400522),  # the paper's form at beta = 8 (Pick-a-Pic, SDXL)
        (64.0, 1 / 64, 1.0, 0.11077503838322039),
    ],
)
def test_loss_equals_the_transcription(s, lam, kappa, expected):
    e_w, e_l = (
        torch.tensor([0.10, 0.12], dtype=torch.float64),
        torch.tensor([0.12, 0.10], dtype=torch.float64),
    )
    out = mapo_loss(e_w, e_l, link_scale=s, margin_weight=lam, logit_scale=kappa)
    want = [transcribed(0.10, 0.12, s, lam, kappa), transcribed(0.12, 0.10, s, lam, kappa)]
    torch.testing.assert_close(out.loss, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert out.loss[0].item() == pytest.approx(expected, rel=1e-12)  # worked by hand (docs/math.md §5)
    margin = out.reward_w - out.reward_l  # the margin's logit, logged
    assert margin[0] > 0 > margin[1]


def test_gradient_lowers_the_winners_error_and_raises_the_losers():
    e_w = torch.tensor([0.10], dtype=torch.float64, requires_grad=True)
    e_l = torch.tensor([0.12], dtype=torch.float64, requires_grad=True)
    mapo_loss(e_w, e_l).loss.sum().backward()
    assert e_w.grad.item() == pytest.approx(1.18021, rel=1e-4)  # 1 + the margin's pull (finite differences)
    assert e_l.grad.item() == pytest.approx(-0.17960, rel=1e-3)  # descent raises the loser's error


def test_the_record_runs_no_reference_and_reads_its_own_section():
    mapo = get_objective("mapo")
    assert not mapo.needs_reference and mapo.noise == "pair"
    cfg = load_config(None, ["model.pretrained=m", "data.path=d", "loss.objective=mapo", "mapo.link_scale=8"])
    from xdpo.train.setup import objective_params

    params = objective_params(cfg, mapo)
    assert params == {"link_scale": 8.0, "margin_weight": 0.1, "logit_scale": 1000.0}
    err = torch.tensor([0.10, 0.12])
    out = mapo.loss(LossInput(err=err, ref=None, pairs=True), **params)
    assert out.loss.item() == pytest.approx(transcribed(0.10, 0.12, 8.0, 0.1, 1000.0), rel=1e-6)
    with pytest.raises(Exception, match="mapo.link_scale`: must be > 0"):
        load_config(None, ["model.pretrained=m", "data.path=d", "loss.objective=mapo", "mapo.link_scale=0"])


def test_a_digits_run_makes_no_reference_and_runs_none(tmp_path, monkeypatch):
    """MaPO on the digits base: no reference copy is made (Reference is never built) and the step never
    calls a reference; the run trains and saves."""
    from xdpo.apps.digits.pairs import make_pairs
    from xdpo.train import setup

    pairs = tmp_path / "pairs.parquet"
    make_pairs(pairs, 8, seed=0, steps=4, progress=False)

    def no_reference(*a, **kw):
        raise AssertionError("a reference was built for a reference-free objective")

    monkeypatch.setattr(setup, "Reference", no_reference)
    kw = {"loss.objective": "mapo", "data.resolution": 32, "train.batch_size": 4, "train.max_steps": 3,
          "train.learning_rate": 3e-5, "train.checkpoint_every": 0}  # fmt: skip
    out = run_training(tmp_path / "run", "digits", pairs, **kw)
    rows = [__import__("json").loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert "ref_updates" not in rows[-1]  # no reference metrics: there is no reference
    assert (out / "final" / "unet").is_dir()
