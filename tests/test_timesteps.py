"""Skewed timestep sampling and SNR weighting (Kang et al. 2025)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from xdpo.objectives.timesteps import bin_probabilities, sample_timesteps, snr_lambda_table, timestep_weights


def sd_scheduler():
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )


def test_uniform_covers_the_range():
    t = sample_timesteps(20000, 1000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.long
    assert abs(t.float().mean().item() - 499.5) < 10


@pytest.mark.parametrize("gamma", [0.9, 0.6])
def test_skewed_bin_frequencies_match_gamma_powers(gamma):
    n, bins = 20000, 10
    t = sample_timesteps(
        n, 1000, sampling="skewed", bins=bins, gamma=gamma, generator=torch.Generator().manual_seed(1)
    )
    assert t.min() >= 0 and t.max() <= 999
    k = bins - 1 - torch.div(t, 100, rounding_mode="floor")  # k = 0: the noisiest bin [900, 1000)
    observed = torch.bincount(k, minlength=bins).double()
    expected = n * bin_probabilities(bins, gamma)
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    assert observed[0] > observed[-1]  # the noisiest bin is the most likely
    # within a bin, t is uniform: the top bin's mean is near its middle
    top = t[k == 0].float()
    assert abs(top.mean().item() - 949.5) < 3


def test_skewed_with_gamma_one_is_uniform_over_bins():
    t = sample_timesteps(
        20000, 1000, sampling="skewed", bins=10, gamma=1.0, generator=torch.Generator().manual_seed(2)
    )
    counts = torch.bincount(torch.div(t, 100, rounding_mode="floor"), minlength=10).double()
    assert ((counts - 2000) ** 2 / 2000).sum().item() < 27.9


def test_snr_weight_runs_from_two_to_one_monotonically():
    a = sd_scheduler().alphas_cumprod.double()
    table = snr_lambda_table(a / (1 - a))
    assert table.shape == (1000,)
    assert table[-1].item() == pytest.approx(2.0) and table[0].item() == pytest.approx(1.0)
    assert (table[1:] >= table[:-1]).all()
    t = torch.tensor([0, 999, 500])
    torch.testing.assert_close(timestep_weights(t, "snr", table), table[t])
    assert timestep_weights(t, "constant", None) is None


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="sampling"):
        sample_timesteps(2, 1000, sampling="cosine")
    with pytest.raises(ValueError, match="weighting"):
        timestep_weights(torch.tensor([1]), "min_snr", None)
