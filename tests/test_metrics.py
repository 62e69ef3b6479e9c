"""`summarize`: the per-step metrics of metrics.jsonl, against the plain per-row computation, bit for bit."""

from __future__ import annotations

import pytest
import torch

from xdpo.objectives import preference_loss
from xdpo.train.metrics import summarize

KEYS = [
    "loss",
    "implicit_acc",
    "reward_margin",
    "reward_w",
    "reward_l",
    "clamp_fraction",
    "delta_w",
    "delta_l",
    "delta_abs_max",
    "timestep_mean",
    "lambda_mean",
    "delta_q05",
    "delta_q50",
    "delta_q95",
]


def reference_summary(records, world: int = 1) -> dict:
    """Each metric by itself: per-row means of the gathered [rows, pairs] block (the earlier code)."""
    rows = []
    for r, ts, w in records:
        b = ts.shape[0]
        lam = torch.ones(b) if w is None else w.float()
        c = r.clamped.float().view(2, b)
        rows.append(
            torch.stack(
                [r.loss.detach().float(), r.reward_w.float(), r.reward_l.float(), r.delta_w.float()]
                + [r.delta_l.float(), ts.float(), lam, c[0], c[1]]
            )
        )
    g = torch.cat([torch.cat(rows, dim=1).T.contiguous()] * world).T
    loss, rw, rl, dw, dl, t, lam, cw, cl = g
    margin, deltas = rw - rl, torch.cat([dw, dl])
    stats = [
        loss.mean(),
        ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
        margin.mean(),
        rw.mean(),
        rl.mean(),
        torch.cat([cw, cl]).mean(),
        dw.mean(),
        dl.mean(),
        deltas.abs().max(),
        t.mean(),
        lam.mean(),
        *torch.quantile(deltas, torch.tensor([0.05, 0.5, 0.95])),
    ]
    return {**dict(zip(KEYS, torch.stack(stats).tolist(), strict=True)), "deltas": deltas.tolist()}


class Gather:
    """accelerator.gather of `world` processes that all hold the same block."""

    def __init__(self, world: int) -> None:
        self.world = world

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        assert x.is_contiguous()
        return torch.cat([x] * self.world)


@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [1, 4, 37])
def test_summarize_equals_the_per_row_computation(micro, world, dtype, b):
    g = torch.Generator().manual_seed(b * 10 + micro)
    records = []
    for k in range(micro):
        e, ref = (torch.rand(2 * b, generator=g, dtype=dtype) * 0.1 for _ in range(2))
        e[0] = ref[0]  # a tie: implicit accuracy counts it 0.5
        weight = None if k % 2 == 0 else torch.rand(b, generator=g) + 1
        out = preference_loss(
            e[:b], e[b:], ref[:b], ref[b:], divergence="xdpo", clamp=0.02, weight=weight, beta=500.0
        )  # clamp engages for some
        records.append((out, torch.randint(0, 1000, (b,), generator=g), weight))
    got = summarize(Gather(world), records, keep_deltas=True)
    want = reference_summary(records, world)
    assert list(got) == list(want)
    for k, v in want.items():
        if k == "deltas":
            assert got[k] == [float(f"{d:.5g}") for d in v]
        else:
            assert got[k] == v or (v != v and got[k] != got[k]), k  # bit for bit (NaN stays NaN)
    assert "deltas" not in summarize(Gather(world), records)


# ---- diagnostics: accuracy and margin per timestep bucket, the effective beta, the chance warning ----


def fixed_pairs(beta: float = 2.0):
    """Eight pairs with chosen deltas and timesteps (T = 1000, 4 buckets: t0-249, t250-499, t500-749,
    t750-999). Diffusion-DPO's margin is -(beta / 2) (delta_w - delta_l) (reverse_kl: f'(z) = log z)."""
    d_w = torch.tensor([-1.0, -3.0, 2.0, 0.5, -2.0, 1.0, 0.0, 4.0])
    d_l = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.0, -1.0, 0.0, 0.0])
    t = torch.tensor([10, 249, 250, 499, 600, 749, 260, 100])
    zero = torch.zeros(8)
    out = preference_loss(zero + d_w, zero + d_l, zero, zero, beta=beta)  # e_ref = 0: delta = e
    return out, t, d_w, d_l


def test_accuracy_and_margin_per_bucket_equal_their_closed_forms():
    out, t, d_w, d_l = fixed_pairs(beta=2.0)
    row = summarize(Gather(1), [(out, t, None)], buckets=4, num_steps=1000)
    # bucket t0-249: pairs 0, 1, 7: margins -(d_w - d_l) = 2, 4, -4 -> accuracy 2/3, margin 2/3
    assert row["implicit_acc_t0-249"] == pytest.approx(2 / 3)
    assert row["reward_margin_t0-249"] == pytest.approx(2 / 3)
    # t250-499: pairs 2, 3, 6: margins -2, 0 (a tie: 0.5), 0 (a tie) -> accuracy 1/3, margin -2/3
    assert row["implicit_acc_t250-499"] == pytest.approx(1 / 3)
    assert row["reward_margin_t250-499"] == pytest.approx(-2 / 3)
    # t500-749: pairs 4, 5: margins 2, -2 -> 0.5, 0
    assert row["implicit_acc_t500-749"] == pytest.approx(0.5)
    assert row["reward_margin_t500-749"] == pytest.approx(0.0)
    assert row["implicit_acc_t750-999"] is None and row["reward_margin_t750-999"] is None  # no pairs
    margin = -(d_w - d_l)
    assert row["implicit_acc"] == pytest.approx(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
    assert row["reward_margin"] == pytest.approx(margin.mean())
    # the same step across 2 processes and 2 micro-batches: the means do not move
    two = summarize(Gather(2), [(out, t, None), (out, t, None)], buckets=4, num_steps=1000)
    assert {k: v for k, v in two.items() if "_t" in k} == {k: v for k, v in row.items() if "_t" in k}


def test_bucket_names_cover_every_timestep_once():
    from xdpo.train.metrics import bucket_names

    assert bucket_names(4, 1000) == ["t0-249", "t250-499", "t500-749", "t750-999"]
    assert bucket_names(3, 10) == ["t0-2", "t3-5", "t6-9"]
    assert "implicit_acc_t0-249" not in summarize(Gather(1), [fixed_pairs()[:2] + (None,)])  # buckets=0: off


def diag_config(**overrides):
    from xdpo.config import load_config

    values = {"model.pretrained": "x", "data.path": "x", "train.chance_warning_steps": 4, **overrides}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def test_effective_beta_is_the_objectives_scale_times_mean_lambda():
    from xdpo.objectives import get_objective
    from xdpo.train.metrics import Diagnostics

    out, t, _, _ = fixed_pairs()
    lam = torch.linspace(1, 2, 8)
    pair = Diagnostics(diag_config(**{"loss.beta": 300}), get_objective("pair"), 1000, 8, 1e-5)
    assert pair.row(Gather(1), [(out, t, lam)])["beta_eff"] == pytest.approx(300 * 1.5)
    assert "loss.beta (300)" in pair.about()
    mapo = Diagnostics(diag_config(**{"mapo.logit_scale": 7}), get_objective("mapo"), 1000, 8, 1e-5)
    assert mapo.row(Gather(1), [(out, t, None)])["beta_eff"] == pytest.approx(7.0)  # kappa, not loss.beta
    assert "mapo.logit_scale (7)" in mapo.about()
    sft = Diagnostics(diag_config(), get_objective("sft"), 1000, 8, 1e-5)
    assert "beta_eff" not in sft.row(Gather(1), [(out, t, None)]) and "none" in sft.about()


def test_the_chance_warning_comes_once_when_accuracy_stays_at_chance():
    from xdpo.objectives import get_objective
    from xdpo.train.metrics import Diagnostics

    def lines(accs, **kw):
        cfg = diag_config(**kw)
        d = Diagnostics(cfg, get_objective(cfg.loss.objective), 1000, 100, 1e-5)
        got = [d.chance_warning(s, {"implicit_acc": a, "reward_margin": 0.01, "beta_eff": 5.0})
               for s, a in enumerate(accs, start=1)]  # fmt: skip
        return [g for g in got if g]

    at_chance = lines([0.9, 0.9, 0.52, 0.47, 0.5, 0.5, 0.5])  # steps 3-4 (200 pairs): 0.495, band 0.071
    assert len(at_chance) == 1
    assert "after 4 steps" in at_chance[0] and "loss.beta" in at_chance[0] and "learning rate" in at_chance[0]
    assert lines([0.5, 0.5, 0.7, 0.7, 0.5, 0.5]) == []  # learning: above the band at the check
    assert lines([0.5] * 6, **{"train.chance_warning_steps": 0}) == []  # off
    assert lines([0.5] * 6, **{"loss.objective": "sft"}) == []  # no preference scale, rewards 0 by design
