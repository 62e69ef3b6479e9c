"""Diffusion-KTO's reference point: a running window over an optimizer step's images, never one pair."""

from __future__ import annotations

import torch

from xdpo.objectives import ReferencePoint as KTOReferencePoint
from xdpo.objectives import kto_loss


def test_one_pair_per_step_no_longer_degenerates_into_a_pairwise_loss():
    """Audit: with the mean over one pair as z0, KTO's two losses collapse to 1 - sigma(beta (g_w - g_l) / 2)
    whenever that mean is positive. With z0 from a window of earlier images they do not."""
    beta = 50.0
    g_w, g_l = torch.tensor([0.030]), torch.tensor([0.010])
    e_ref_w, e_ref_l = torch.tensor([0.5]), torch.tensor([0.5])
    e_w, e_l = e_ref_w - g_w, e_ref_l - g_l
    pairwise = 1 - torch.sigmoid(beta * (g_w - g_l) / 2)
    old = kto_loss(e_w, e_l, e_ref_w, e_ref_l, beta=beta)  # z0 = mean of this pair's two images
    torch.testing.assert_close(old.loss, pairwise)  # the degenerate case, reproduced
    window = KTOReferencePoint(size=8)
    window.update(torch.tensor([-0.02, 0.00, 0.01, -0.01, 0.02, -0.03]))  # earlier micro-batches
    z0 = window.update(torch.cat([g_w, g_l]))
    assert abs(z0.item() - sum([-0.02, 0.00, 0.01, -0.01, 0.02, -0.03, 0.03, 0.01]) / 8) < 1e-7
    new = kto_loss(e_w, e_l, e_ref_w, e_ref_l, beta=beta, reference_point=z0)
    m = max(z0.item(), 0.0)
    expected = 0.5 * ((1 - torch.sigmoid(beta * (g_w - m))) + (1 - torch.sigmoid(-beta * (g_l - m))))
    torch.testing.assert_close(new.loss, expected)
    assert not torch.allclose(new.loss, pairwise)


def test_window_keeps_the_last_images_and_round_trips():
    w = KTOReferencePoint(size=3)
    w.update(torch.tensor([1.0, 2.0]))
    assert w.update(torch.tensor([3.0, 4.0])).item() == 3.0  # mean of 2, 3, 4
    other = KTOReferencePoint(size=3)
    other.load(w.state())
    assert other.update(torch.tensor([5.0])).item() == w.update(torch.tensor([5.0])).item() == 4.0
