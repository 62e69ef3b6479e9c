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
        not o.enabled or (bool(o.prompts) and bool(o.scorer)),
        "online.enabled",
        "needs online.prompts and online.scorer",
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

    lo, d = cfg.loss, cfg.data
    obj = get_objective(lo.objective)
    accepting = [o.name for o in OBJECTIVES.values() if d.format in o.data]
    require(
        d.format in obj.data,
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
