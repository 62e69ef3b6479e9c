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
