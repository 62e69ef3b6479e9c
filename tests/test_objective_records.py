"""Objectives as records: the recipe asks the record (reference, noise, data, labels, state), never the name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from xdpo.config import load_config
from xdpo.errors import ConfigError
from xdpo.objectives import OBJECTIVES, LossInput, Objective, get_objective

SRC = Path(__file__).resolve().parents[1] / "src" / "xdpo"
HARNESSES = ("apps",)
"""The demo and study name their methods (`sft`, `kto`, ...) as keys of their own tables: allowed there."""


def objective_name_comparisons(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, literal) of every comparison (==, !=, in, not in) of something named `objective` with an
    objective's name (names such as `pair` also name flip and noise modes: only objectives count)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and "objective" in ast.unparse(node):
            for part in (node.left, *node.comparators):
                elts = part.elts if isinstance(part, ast.Tuple | ast.List | ast.Set) else [part]
                for e in elts:
                    if isinstance(e, ast.Constant) and e.value in names:
                        found.append((node.lineno, e.value))
    return found


def test_the_finder_finds_name_comparisons():
    text = 'if lc.objective == "kto":\n    pass\nx = cfg.loss.objective in ("sft", "y")\nd = {"kto": 1}\n'
    text += 'f = flip == "sft"\n'
    assert objective_name_comparisons(text, {"kto", "sft"}) == [(1, "kto"), (3, "sft")]


def test_no_source_outside_the_objectives_compares_an_objective_name():
    names = set(OBJECTIVES)
    found = [
        f"{path.relative_to(SRC.parent)}:{line}: {s!r}"
        for path in sorted(SRC.rglob("*.py"))
        if "objectives" not in path.relative_to(SRC).parts[:1]
        and path.relative_to(SRC).parts[0] not in HARNESSES
        for line, s in objective_name_comparisons(path.read_text(), names)
    ]
    assert not found, "objective names compared outside objectives/ (ask the record):\n" + "\n".join(found)


def test_config_rules_come_from_the_record():
    base = ["model.pretrained=m", "data.path=d"]
    with pytest.raises(ConfigError, match="data.format`: images needs loss.objective=kto or seppo, not sft"):
        load_config(None, [*base, "data.format=images", "loss.objective=sft"])
    with pytest.raises(
        ConfigError, match="data.ties`: keep trains ties as soft labels, which loss.objective=sft"
    ):
        load_config(None, [*base, "data.ties=keep", "loss.objective=sft"])
    with pytest.raises(
        ConfigError, match="reference.strategy`: has no effect: loss.objective=sft runs no reference"
    ):
        load_config(None, [*base, "loss.objective=sft", "reference.strategy=ema"])
    assert load_config(None, [*base, "data.ties=keep"]).data.ties == "keep"  # pair uses soft labels


def test_a_reference_free_objective_gets_no_reference(tiny_pipeline_dir):
    from xdpo.train.setup import single_process

    cfg = load_config(None, [f"model.pretrained={tiny_pipeline_dir}", "data.path=d", "loss.objective=sft"])
    ctx, models = single_process(cfg)
    assert models.reference is None and ctx.reference is None  # no copy made, nothing to run
    cfg = load_config(None, [f"model.pretrained={tiny_pipeline_dir}", "data.path=d"])
    assert single_process(cfg)[1].reference is not None


def test_per_image_noise_and_state_are_traits():
    """KTO draws (t, eps) per image and keeps a reference-point window; the pair objective shares the pair's."""
    kto, pair = get_objective("kto"), get_objective("pair")
    assert (kto.noise, pair.noise) == ("image", "pair")
    assert kto.state is not None and pair.state is None
    window = kto.state(4)
    err, ref = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.2, 0.2, 0.2, 0.2])
    out = kto.loss(LossInput(err=err, ref=ref, pairs=True, state=window), beta=10.0)
    assert window.state() == pytest.approx([0.1, 0.0, -0.1, -0.2])  # g = e_ref - e_theta, all four images
    assert out.loss.shape == (2,)


def test_a_new_objective_is_one_record_and_one_registry_line(tiny_pipeline_dir, pairs_parquet, tmp_path):
    """A throwaway reference-free objective (the winner's error minus the loser's) registered at run time
    trains through the recipe without any other edit."""
    from conftest import run_training
    from xdpo.objectives import register_objective
    from xdpo.objectives.output import loss_output, no_clamps
    from xdpo.objectives.registry import OBJECTIVES as registry

    def margin(inp: LossInput, *, beta: float) -> object:
        b = inp.rows
        d = inp.err[:b] - inp.err[b:]
        zero = torch.zeros_like(d)
        return loss_output(d, -beta * inp.err[:b], -beta * inp.err[b:], no_clamps(b, d.device), zero, zero)

    register_objective(Objective(name="margin-test", about="test", loss=margin, params=("beta",),
                                 needs_reference=False))  # fmt: skip
    try:
        out = run_training(
            tmp_path / "run", tiny_pipeline_dir, pairs_parquet, **{"loss.objective": "margin-test"}
        )
        assert (out / "final").is_dir()
    finally:
        registry.pop("margin-test")
