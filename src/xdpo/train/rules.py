"""The training recipe's rules across config keys (a rule owner of `xdpo.config.rules`): where the pairs
come from (a dataset, the cache, online rounds), what the reference strategy allows, and what the
objective record declares (its data formats, soft labels, a reference; then its own `check`)."""

from __future__ import annotations

from typing import Any

from xdpo.config import require


def check(cfg: Any) -> None:
    from xdpo.train.reference import STRATEGIES

    check_source(cfg)
    check_errors(cfg)
    STRATEGIES[cfg.reference.strategy].check(cfg)
    require(
        cfg.reference.place != "sharded" or cfg.reference.strategy == "frozen",
        "reference.place",
        "sharded holds a frozen reference only (a moving reference blends whole weights); use cpu or device",
        cfg.reference.place,
    )
    check_objective(cfg)
    check_timesteps(cfg)


def check_errors(cfg: Any) -> None:
    """Flow-DPO's beta schedule on velocity errors only: epsilon errors of a flow model already carry it."""
    lo = cfg.loss
    require(
        not (lo.beta_schedule == "flow" and lo.error_space == "epsilon"),
        "loss.beta_schedule",
        "flow with loss.error_space=epsilon applies (1 - sigma)^2 twice (epsilon errors of a flow model are "
        "velocity errors times (1 - sigma)^2); use loss.error_space=native",
        lo.beta_schedule,
    )


def check_source(cfg: Any) -> None:
    """A dataset (`data.path`, possibly cached) or online rounds, which need prompts and a scorer."""
    d, o = cfg.data, cfg.online
    require(bool(d.path) or o.enabled, "data.path", "required (Pick-a-Pic v2 format pairs)", d.path)
    require(
        not o.enabled or (bool(o.prompts) and bool(o.scorer or o.labels)),
        "online.enabled",
        "needs online.prompts and online.scorer (or online.labels)",
        o.enabled,
    )
    require(
        not (o.enabled and d.cache),
        "online.enabled",
        "on-policy pairs cannot come from data.cache",
        o.enabled,
    )


def check_objective(cfg: Any) -> None:
    """What the objective record declares: the data formats it trains on, soft labels for kept ties, a
    reference to update; then its own cross-field rules."""
    from xdpo.objectives import OBJECTIVES, get_objective

    lo, d, o = cfg.loss, cfg.data, cfg.online
    obj = get_objective(lo.objective)
    rollouts = "rollouts" in obj.data
    require(
        not rollouts or o.enabled,
        "loss.objective",
        f"{obj.name} trains on rollouts sampled from the policy: set online.enabled=true with online.prompts "
        "and online.scorer",
        lo.objective,
    )
    require(
        not o.stop_on or bool(o.heldout_scorer), "online.stop_on", "needs online.heldout_scorer", o.stop_on
    )
    accepting = [x.name for x in OBJECTIVES.values() if d.format in x.data]
    require(
        rollouts or d.format in obj.data,
        "data.format",
        f"{d.format} needs loss.objective={' or '.join(accepting)}, not {obj.name}",
        d.format,
    )
    require(
        d.ties == "drop" or obj.uses_labels,
        "data.ties",
        f"keep trains ties as soft labels, which loss.objective={obj.name} does not use; set data.ties=drop",
        d.ties,
    )
    require(
        cfg.reference.strategy == "frozen" or obj.needs_reference,
        "reference.strategy",
        f"has no effect: loss.objective={obj.name} runs no reference model; leave it frozen",
        cfg.reference.strategy,
    )
    if obj.check is not None:
        obj.check(cfg)


def check_timesteps(cfg: Any) -> None:
    """`timesteps.weighting=dense` is DenseReward's discount as an importance weight over uniform t, one per
    noise draw on each row's loss: with another sampler the discounts compound, and a row pooling two draws
    (an objective drawing noise per image, on pairs) has no one weight."""
    from xdpo.objectives import get_objective

    ts, obj = cfg.timesteps, get_objective(cfg.loss.objective)
    if ts.weighting != "dense":
        return
    require(
        ts.sampling in ("auto", "uniform"),
        "timesteps.sampling",
        "must be uniform (or auto) with timesteps.weighting=dense, an importance weight over uniform t (for "
        "DenseReward as sampling: sampling=skewed bins=50 gamma=0.9 weighting=constant)",
        ts.sampling,
    )
    require(
        not (obj.noise == "image" and cfg.data.format == "pairs"),
        "timesteps.weighting",
        f"dense weights each row's loss by its noise draw; loss.objective={obj.name} on pairs pools two images "
        "drawn at different t in one row (use data.format=images, or weighting=snr)",
        ts.weighting,
    )
