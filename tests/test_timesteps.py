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


# ---- the sampler's closed-form probabilities, normalisation, DenseReward's discount --------------------


def ts_config(**kw):
    from xdpo.config import TimestepConfig

    return TimestepConfig(**kw)


class Process:
    """A stand-in noise process: T timesteps and a weighting basis."""

    def __init__(self, basis):
        self.num_steps, self.basis = basis.shape[0], basis

    def weighting_basis(self):
        return self.basis


def sd_process():
    from xdpo.models.noise import DDPMProcess

    return DDPMProcess(sd_scheduler())


@pytest.mark.parametrize(
    "sampling,kw",
    [("uniform", {}), ("skewed", {"bins": 10, "gamma": 0.8}), ("skewed", {"bins": 7, "gamma": 0.9}),
     ("logit_normal", {"mean": 0.3, "std": 1.2})],
)  # fmt: skip
def test_timestep_probabilities_match_the_sampler(sampling, kw):
    from xdpo.objectives.timesteps import timestep_probabilities

    T, n = 1000, 200_000
    p = timestep_probabilities(T, sampling, **kw)
    assert p.shape == (T,) and abs(p.sum().item() - 1) < 1e-12 and (p >= 0).all()
    t = sample_timesteps(n, T, sampling=sampling, generator=torch.Generator().manual_seed(3), **kw)
    # decile frequencies against the closed form (chi-square, 9 degrees of freedom, p = 0.001)
    observed = torch.bincount(torch.div(t, 100, rounding_mode="floor"), minlength=10).double()
    expected = n * p.view(10, 100).sum(1)
    assert ((observed - expected) ** 2 / expected).sum().item() < 27.9
    assert abs(t.double().mean().item() - (p * torch.arange(T)).sum().item()) < 2.0


def test_snr_weight_means_and_normalize_gives_mean_one_under_skewed_sampling():
    """Kang et al.'s lambda averages 1.2051 under uniform t and 1.2673 under skewed K = 10, gamma = 0.9 on SD's
    schedule (docs/math.md §7); `normalize` divides by that mean, so E lambda = 1 under the sampler."""
    from xdpo.objectives.timesteps import timestep_probabilities, weight_tables

    proc = sd_process()
    uniform = weight_tables(ts_config(sampling="uniform", weighting="snr"), proc)
    skewed = weight_tables(ts_config(sampling="skewed", weighting="snr"), proc)
    assert uniform.mean == pytest.approx(1.2051, abs=1e-4) and skewed.mean == pytest.approx(1.2673, abs=1e-4)
    torch.testing.assert_close(skewed.lam, snr_lambda_table(proc.snr()))  # the paper's, untouched
    assert skewed.loss is None

    norm = weight_tables(ts_config(sampling="skewed", weighting="snr", normalize=True), proc)
    p = timestep_probabilities(1000, "skewed", bins=10, gamma=0.9)
    assert (p * norm.lam.double()).sum().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(norm.lam, skewed.lam / 1.2673, atol=1e-4, rtol=0)
    t = sample_timesteps(200_000, 1000, sampling="skewed", generator=torch.Generator().manual_seed(4))
    assert norm.lam[t].mean().item() == pytest.approx(1.0, abs=0.005)
    assert skewed.lam[t].mean().item() == pytest.approx(1.2673, abs=0.005)
    assert "E w = 1.267 on beta, normalised to 1" in norm.describe("snr", "skewed")


def sd_ddim_timesteps():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      set_alpha_to_one=False, clip_sample=False)  # fmt: skip  # SD 1.5's sampler
    s.set_timesteps(50)
    return s.timesteps


def dense_closed_form(k, gamma=0.9, n=50):
    c = (1 - gamma**n) / (1 - gamma)
    return n * gamma**k / c


def test_dense_weights_at_a_ddim_samplers_timesteps():
    """w(t) = N gamma^k / C at SD's 50-step DDIM grid (981, 961, ..., 1; step k = 0 the noisiest), mean 1
    under uniform t."""
    from xdpo.objectives.timesteps import weight_tables

    tables = weight_tables(ts_config(sampling="uniform", weighting="dense", discount=0.9), sd_process())
    assert tables.lam is None and tables.mean == pytest.approx(1.0, abs=1e-6)
    w = tables.loss
    grid = sd_ddim_timesteps()
    assert grid[0] == 981 and grid[-1] == 1 and len(grid) == 50
    for k, t in enumerate(grid.tolist()):
        assert w[t].item() == pytest.approx(dense_closed_form(k), rel=1e-6), (k, t)
    # piecewise constant over each step's 20 training timesteps (the importance weight of skewed bins=50)
    assert w[999].item() == w[980].item() == pytest.approx(5.025902371034249, rel=1e-6)  # N / C
    assert w[979].item() == pytest.approx(0.9 * 5.025902371034249, rel=1e-6)
    assert w[19].item() == w[0].item() == pytest.approx(dense_closed_form(49), rel=1e-6)
    assert w.double().mean().item() == pytest.approx(1.0, abs=1e-6)
    assert (w[1:] >= w[:-1]).all()  # heavier toward noise


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dense_weights_at_a_flow_samplers_sigmas(shift):
    """Flow families: k counts the sampler's steps from the noise end on the unshifted time, which is the
    training index of the ascending sigma table: at each of the 50 Euler steps' sigmas (SD3's shift 3 or
    none) the weight is N gamma^k / C whatever the shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from xdpo.models.noise import FlowProcess
    from xdpo.objectives.timesteps import weight_tables

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    proc = FlowProcess(sched)
    w = weight_tables(ts_config(sampling="uniform", weighting="dense", discount=0.9), proc).loss
    sched.set_timesteps(50)
    for k, sigma in enumerate(sched.sigmas[:-1].double().tolist()):
        t = int((proc.sigmas - sigma).abs().argmin())  # the training index of the sampler's sigma
        assert abs(proc.sigmas[t].item() - sigma) < 2e-3
        assert w[t].item() == pytest.approx(dense_closed_form(k), rel=1e-6), (k, sigma, t)


def test_dense_with_another_sampler_is_refused_and_auto_is_uniform(tiny_pipeline_dir):
    from xdpo.config import load_config
    from xdpo.errors import ConfigError
    from xdpo.train.setup import resolve_timesteps

    base = [f"model.pretrained={tiny_pipeline_dir}", "data.path=x", "timesteps.weighting=dense"]
    with pytest.raises(ConfigError, match="timesteps.sampling.*uniform"):
        load_config(None, [*base, "timesteps.sampling=skewed"])
    with pytest.raises(ConfigError, match="timesteps.weighting.*pools two images"):
        load_config(None, [*base, "loss.objective=kto"])
    load_config(None, [*base, "loss.objective=kto", "data.format=images"])  # one draw per row: allowed
    cfg = load_config(None, base)
    resolve_timesteps(cfg, "flow")
    assert cfg.timesteps.sampling == "uniform"  # not the flow families' logit_normal


@pytest.mark.parametrize("objective", ["pair", "sft", "mapo"])
def test_dense_multiplies_each_rows_loss_outside_the_outer_loss(tiny_pipeline_dir, pairs_parquet, objective):
    """The step's loss with `dense` is the unweighted loss times w(t) of the row's draw, for every objective;
    the rewards (inside the sigmoid) are untouched."""
    from xdpo.config import load_config
    from xdpo.data import PreferencePairs, collate_pairs, load_preference_table
    from xdpo.train.setup import single_process
    from xdpo.train.step import train_step

    over = [f"model.pretrained={tiny_pipeline_dir}", f"data.path={pairs_parquet}", f"loss.objective={objective}",
            "timesteps.weighting=dense", "timesteps.discount=0.8"]  # fmt: skip
    m, _ = single_process(load_config(None, over))
    pairs = PreferencePairs(load_preference_table(str(pairs_parquet)), resolution=32)
    batch = collate_pairs([pairs[(i, 0)] for i in range(4)])
    with torch.no_grad():
        weighted = train_step(m, batch, torch.Generator().manual_seed(5))
        table, m.loss_weight_table = m.loss_weight_table, None
        plain = train_step(m, batch, torch.Generator().manual_seed(5))
    assert table is not None and table[999].item() > 1 > table[0].item()
    torch.testing.assert_close(weighted.timesteps, plain.timesteps)
    torch.testing.assert_close(weighted.out.loss, plain.out.loss * table[plain.timesteps])
    torch.testing.assert_close(weighted.out.reward_w, plain.out.reward_w)
