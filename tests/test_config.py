"""Config parsing and the promised one-line errors of `xdpo train` (config, model and data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xdpo.cli import main
from xdpo.config import all_keys, load_config
from xdpo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = [
    "output_dir",
    "seed",
    "model.pretrained",
    "model.lora_rank",
    "data.path",
    "data.split",
    "data.resolution",
    "data.ties",
    "data.prompt_dropout",
    "loss.divergence",
    "loss.outer",
    "loss.objective",
    "loss.beta",
    "loss.eta",
    "loss.gamma",
    "loss.n",
    "loss.alpha",
    "loss.label_smoothing",
    "loss.logratio_scale",
    "train.max_steps",
    "train.batch_size",
    "train.grad_accum",
    "train.learning_rate",
    "train.scale_lr",
    "train.warmup_steps",
    "train.max_grad_norm",
    "train.mixed_precision",
    "train.optimizer",
    "train.checkpoint_every",
    "train.checkpoints_keep",
    "train.resume_from",
]


def test_every_interface_key_exists():
    assert set(REQUIRED_KEYS) <= set(all_keys())


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "model:\n  pretrained: m\ndata:\n  path: d\nloss:\n  beta: 2000\ntrain:\n  learning_rate: 1e-8\n"
    )
    cfg = load_config(f, ["loss.beta=1000", "loss.divergence=xdpo", "model.lora_targets=to_q,to_v"])
    assert cfg.loss.beta == 1000.0 and cfg.loss.divergence == "xdpo"
    assert cfg.train.learning_rate == 1e-8  # YAML 1.1 reads 1e-8 as a string; accepted as a float
    assert cfg.model.lora_targets == ["to_q", "to_v"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    load_config(path, ["data.path=x"] if "digits" in path.name else [])


def test_xdpo_config_has_the_paper_defaults():
    cfg = load_config(ROOT / "configs" / "sd15-pickapic-xdpo.yaml")
    assert (cfg.loss.divergence, cfg.loss.beta, cfg.loss.eta, cfg.loss.n) == ("xdpo", 1000.0, 0.05, 6.0)
    assert cfg.loss.gamma == pytest.approx(1 / 6)
    assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.train.grad_accum) == (1e-8, 1, 128)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.bta=3", "unknown config key `loss.bta` (did you mean `loss.beta`?)"),
        ("train.max_step=3", "did you mean `train.max_steps`?"),
        ("train.max_steps=abc", "config key `train.max_steps`: expected int, got 'abc'"),
        ("loss.divergence=kl", "config key `loss.divergence`: expected reverse_kl | xdpo"),
        ("loss.beta=-1", "config key `loss.beta`: must be > 0"),
        ("data.resolution=30", "config key `data.resolution`: must be a multiple of 8"),
        ("train.scale_lr=maybe", "config key `train.scale_lr`: expected bool"),
        ("loss.label_smoothing=0.1", "only applies to loss.outer=sigmoid or robust"),
        ("model", "expected KEY=VALUE"),
    ],
)
def test_config_errors_are_one_clear_line_and_write_nothing(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    extra = ["loss.outer=hinge"] if "label_smoothing" in override else []
    rc = main(["train", "model.pretrained=m", "data.path=d", f"output_dir={out}", override, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (  # epsilon errors already carry (1 - sigma)^2: the flow schedule would apply it twice
            ["loss.beta_schedule=flow", "loss.error_space=epsilon"],
            "config key `loss.beta_schedule`: flow with loss.error_space=epsilon applies (1 - sigma)^2 twice",
        ),
        (  # SFT would train the first image of a tie as if it were preferred
            ["loss.objective=sft", "data.ties=keep"],
            "config key `data.ties`: keep trains ties as soft labels, which loss.objective=sft does not use",
        ),
    ],
    ids=["flow-schedule-on-epsilon-errors", "sft-on-ties"],
)
def test_conflicting_keys_are_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.pretrained=m", "data.path=d", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_required_keys():
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(None, ["data.path=d"])
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["model.pretrained=m"])


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    section = tmp_path / "section.yaml"
    section.write_text("loss: 3\n")
    with pytest.raises(ConfigError, match="`loss`: expected a section"):
        load_config(section)


def test_help_lists_every_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for key in all_keys():
        assert key in text
    assert "default 5000.0" in text  # loss.beta


def test_the_config_page_documents_every_key():
    page = (ROOT / "docs" / "config.md").read_text()
    missing = [k for k in all_keys() if f"| `{k}` |" not in page]  # a row of the table
    assert not missing, f"docs/config.md's key table lacks {missing}"


def _run(tmp_path, capsys, *args):
    """The real command in a subprocess: exactly what a user sees on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "xdpo", "train", f"output_dir={tmp_path / 'run'}", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in proc.stderr
    return proc.returncode, proc.stderr.strip().splitlines()[-1]  # progress bars may precede the error line


def test_model_path_errors(tmp_path, capsys, pairs_parquet):
    rc, err = _run(tmp_path, capsys, f"model.pretrained={tmp_path}", f"data.path={pairs_parquet}")
    assert (
        rc == 2
        and err.startswith("xdpo train: error: model.pretrained:")
        and "has no model_index.json" in err
    )


def test_data_errors_name_the_column(tmp_path, capsys, tiny_pipeline_dir):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"1"], "label_0": [1.0]}), bad)
    rc, err = _run(tmp_path, capsys, f"model.pretrained={tiny_pipeline_dir}", f"data.path={bad}")
    assert rc == 2 and "jpg_1" in err and str(bad) in err


def test_undecodable_image_names_row_and_column(tmp_path, capsys, tiny_pipeline_dir):
    bad = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table({"caption": ["x"], "jpg_0": [b"not an image"], "jpg_1": [b"nope"], "label_0": [1.0]}), bad
    )
    rc, err = _run(
        tmp_path,
        capsys,
        f"model.pretrained={tiny_pipeline_dir}",
        f"data.path={bad}",
        "data.resolution=32",
        "train.max_steps=1",
    )
    assert rc == 2 and "row 0" in err and "jpg_" in err and "cannot decode" in err


# ---- the config package: registries, declared sections, old names, YAML booleans, the key table ----


def test_importing_the_config_imports_no_torch():
    code = "import sys, xdpo.config; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _choices(key):
    import typing

    from xdpo.config import iter_fields

    return next(typing.get_args(tp) for k, _, tp in iter_fields() if k == key)


def test_choices_are_the_registries():
    from xdpo.models.families import families
    from xdpo.objectives import DIVERGENCES, OBJECTIVES, OUTER_LOSSES
    from xdpo.train.reference import STRATEGIES

    assert _choices("loss.objective") == tuple(OBJECTIVES)
    assert _choices("loss.divergence") == tuple(DIVERGENCES)
    assert _choices("loss.outer") == tuple(OUTER_LOSSES)
    assert _choices("reference.strategy") == tuple(STRATEGIES)
    assert _choices("model.family") == ("auto", *families())


def test_rule_owners_are_found_by_name():
    """The config reaches the rules of components above it by name only (`RULE_OWNERS`)."""
    from xdpo.config import RULE_OWNERS
    from xdpo.config.options import resolve

    assert all(callable(resolve(owner)) for owner in RULE_OWNERS)


@pytest.fixture
def throwaway_objective():
    """An objective with one option, registered for the test (and removed afterwards)."""
    import dataclasses

    from xdpo.config import Option
    from xdpo.objectives import OBJECTIVES, get_objective, register_objective

    option = Option(
        "margin_weight", float, 0.5, "weight of the margin term", check=lambda v: v >= 0, rule="must be >= 0"
    )
    obj = dataclasses.replace(get_objective("pair"), name="throwaway", options=(option,))
    register_objective(obj)
    yield obj
    OBJECTIVES.pop("throwaway")


BASE = ["model.pretrained=m", "data.path=d"]


def test_a_registered_objective_is_a_choice_with_its_own_section(tmp_path, throwaway_objective):
    import pickle

    from xdpo.config import dump_yaml, help_table, markdown_table

    assert "throwaway" in _choices("loss.objective")
    assert "throwaway.margin_weight" in all_keys() and "throwaway.margin_weight" in help_table()
    assert "| `throwaway.margin_weight` | float | 0.5 | weight of the margin term |" in markdown_table()
    cfg = load_config(None, [*BASE, "loss.objective=throwaway", "throwaway.margin_weight=2"])
    assert cfg.loss.objective == "throwaway" and cfg.throwaway.margin_weight == 2.0
    assert isinstance(cfg.throwaway.margin_weight, float)
    with pytest.raises(ConfigError, match=r"config key `throwaway.margin_weight`: must be >= 0, got -1.0"):
        load_config(None, [*BASE, "throwaway.margin_weight=-1"])
    with pytest.raises(ConfigError, match="`throwaway.margin_weight`: expected float, got 'abc'"):
        load_config(None, [*BASE, "throwaway.margin_weight=abc"])
    with pytest.raises(ConfigError, match="did you mean `throwaway.margin_weight`"):
        load_config(None, [*BASE, "throwaway.margin_weigth=1"])
    dump_yaml(cfg, tmp_path / "config.yaml")  # a run's config.yaml: a top-level section, read back
    assert "throwaway:\n  margin_weight: 2.0" in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml") == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # as a spawned worker receives it


def test_an_objective_section_cannot_take_a_section_name():
    import dataclasses

    from xdpo.config import Option
    from xdpo.objectives import OBJECTIVES, get_objective, register_objective

    register_objective(
        dataclasses.replace(get_objective("pair"), name="data", options=(Option("x", int, 0, "x"),))
    )
    try:
        with pytest.raises(ConfigError, match="the options of 'data' would make a section named like `data`"):
            load_config(None, BASE)
    finally:
        OBJECTIVES.pop("data")


def test_an_unregistered_objective_is_refused():
    with pytest.raises(ConfigError, match="`loss.objective`: expected pair | sft | kto"):
        load_config(None, [*BASE, "loss.objective=throwaway"])


def test_the_online_keys_have_their_own_section_and_the_old_ones_still_work(tmp_path, capsys):
    old = ["train.online=true", "train.online_every=5", "train.online_prompts=digits",
           "train.online_per_prompt=3", "train.online_scorer=r", "train.online_min_gap=0.5",
           "train.online_sample_steps=7"]  # fmt: skip
    cfg = load_config(None, ["model.pretrained=m", *old])
    o = cfg.online
    assert (o.enabled, o.every, o.prompts, o.per_prompt, o.scorer, o.min_gap, o.sample_steps) == (
        True, 5, "digits", 3, "r", 0.5, 7
    )  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "xdpo: config key `train.online` is deprecated; use `online.enabled`"
    assert err[-1] == "xdpo: config key `train.online_sample_steps` is deprecated; use `online.sample_steps`"
    assert len(err) == 7
    f = tmp_path / "c.yaml"
    f.write_text(
        "model:\n  pretrained: m\ntrain:\n  online: true\n  online_every: 3\nonline:\n  prompts: p\n  scorer: s\n"
    )
    assert load_config(f).online.every == 3
    assert not any(k.startswith("train.online") for k in all_keys())
    with pytest.raises(ConfigError, match="`online.enabled`: needs online.prompts and online.scorer"):
        load_config(None, ["model.pretrained=m", "online.enabled=true"])
    with pytest.raises(ConfigError, match="`online.per_prompt`: must be >= 2 \\(a pair\\), got 1"):
        load_config(None, [*BASE, "online.per_prompt=1"])


def test_yaml_booleans_keep_their_text_for_string_keys(tmp_path):
    """YAML 1.1 reads no/off/yes/on as booleans: a string-typed key gets the word as written (issue 25)."""
    cfg = load_config(
        None, [*BASE, "train.mixed_precision=no", "data.split=on", "model.lora_targets=on,to_q"]
    )
    assert (cfg.train.mixed_precision, cfg.data.split, cfg.model.lora_targets) == ("no", "on", ["on", "to_q"])
    assert load_config(None, [*BASE, "model.lora_targets=[off, to_q]"]).model.lora_targets == ["off", "to_q"]
    f = tmp_path / "c.yaml"
    f.write_text("model: {pretrained: m, revision: yes}\ndata: {path: d, columns: {caption: on}}\n"
                 "train: {mixed_precision: no, scale_lr: off}\n")  # fmt: skip
    cfg = load_config(f)
    assert (cfg.train.mixed_precision, cfg.train.scale_lr, cfg.model.revision) == ("no", False, "yes")
    assert cfg.data.columns == {"caption": "on"}
    assert load_config(None, [*BASE, "train.scale_lr=no"]).train.scale_lr is False  # a bool key: the boolean
    with pytest.raises(ConfigError, match="`train.max_steps`: expected int, got 'no'"):
        load_config(None, [*BASE, "train.max_steps=no"])
    with pytest.raises(ConfigError, match="`train.mixed_precision`: expected no | fp16 | bf16, got 'yes'"):
        load_config(None, [*BASE, "train.mixed_precision=yes"])


def test_the_config_page_table_is_the_schema():
    from xdpo.config import markdown_table
    from xdpo.config.key_page import key_table_of

    page = (ROOT / "docs" / "config.md").read_text()
    assert key_table_of(page) == markdown_table(), (
        "docs/config.md's key table differs from the schema; rewrite it with "
        "`python -m xdpo.config.key_page docs/config.md`"
    )


def test_the_key_page_writer_replaces_only_the_table(tmp_path):
    """`python -m xdpo.config.key_page PAGE` puts the schema's table between the markers and keeps the rest;
    a page without the markers is refused."""
    from xdpo.config import markdown_table
    from xdpo.config.key_page import KEY_TABLE_END, KEY_TABLE_START, key_table_of

    page = tmp_path / "config.md"
    page.write_text(
        f"# Keys\n\nprose\n\n{KEY_TABLE_START}\n| `stale.key` | int | 1 | gone |\n{KEY_TABLE_END}\n\nafter\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "xdpo.config.key_page", str(page)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    assert key_table_of(text) == markdown_table() and "stale.key" not in text
    assert text.startswith("# Keys\n\nprose\n\n") and text.endswith(f"{KEY_TABLE_END}\n\nafter\n")
    (tmp_path / "bare.md").write_text("no markers\n")
    bad = subprocess.run(
        [sys.executable, "-m", "xdpo.config.key_page", str(tmp_path / "bare.md")], capture_output=True
    )
    assert bad.returncode != 0 and (tmp_path / "bare.md").read_text() == "no markers\n"
