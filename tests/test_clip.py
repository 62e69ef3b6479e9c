"""The loop's gradient clipping and optimizer step (train/distributed.py): torch's values, bit for bit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from xdpo.train.distributed import clip_grad_norm, optimizer_step

CPU = SimpleNamespace(distributed_type=SimpleNamespace(name="NO"), scaler=None, device=torch.device("cpu"))


def params_with_grads(seed: int, dtypes=(torch.float32,)) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3,), (64, 32), (7, 5, 3, 3), (1,), (300,), (2, 2)]
    params = []
    for k, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtypes[k % len(dtypes)]))
        p.grad = (torch.randn(shape, generator=g) * (k + 1)).to(p.dtype)
        params.append(p)
    params.append(torch.nn.Parameter(torch.zeros(4)))  # no gradient
    return params


@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e6])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float64,), (torch.float32, torch.bfloat16)])
def test_clipping_equals_torch(max_norm, dtypes):
    ours, theirs = params_with_grads(0, dtypes), params_with_grads(0, dtypes)
    norm = clip_grad_norm(CPU, ours, max_norm)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert torch.equal(norm, want)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_optimizer_step_skips_only_accelerates_wrapper(monkeypatch):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator = Accelerator(cpu=True)
    ours, theirs = params_with_grads(1), params_with_grads(1)
    optimizer = accelerator.prepare(torch.optim.AdamW(ours, lr=0.1, foreach=True))
    reference = torch.optim.AdamW(theirs, lr=0.1, foreach=True)
    monkeypatch.setattr(AcceleratedOptimizer, "step", lambda *a, **kw: pytest.fail("wrapper called"))
    for _ in range(2):
        optimizer_step(accelerator, optimizer)
        reference.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
