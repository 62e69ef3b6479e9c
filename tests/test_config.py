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


def test_readme_documents_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in all_keys() if f"| `{k}` |" not in readme]  # a row of the table
    assert not missing, f"README config table lacks {missing}"


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
