"""A newcomer's first hour: light `--help`, one line for an unreachable model, a dry run that lists every
problem and fails when a run would, `xdpo check-data` finding a corrupt image."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SRC = Path(__file__).resolve().parents[1] / "src"


def test_help_does_not_import_torch():
    code = (
        "import sys; from xdpo.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "check-data" in out.stdout and "sample" in out.stdout
    assert "TORCH False" in out.stdout


def test_help_of_one_command_loads_only_its_module(capsys):
    from xdpo.cli import build_parser

    parser = build_parser("sample")
    actions = parser._subparsers._group_actions[0].choices
    assert "--vae" in actions["sample"].format_help()
    assert actions["train"].format_help().count("--config") == 0  # a placeholder: train.cli not consulted


def test_offline_hub_id_says_so_in_one_line(monkeypatch):
    import pytest

    from xdpo.errors import ConfigError
    from xdpo.models.load import read_model_index

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        read_model_index("nobody-xdpo/no-such-pipeline")
    text = str(e.value)
    assert "\n" not in text and "offline" in text and "HF_HOME" in text and "hf download" in text
    with pytest.raises(ConfigError, match="does not exist"):
        read_model_index("./no/such/folder")


def test_dry_run_lists_every_problem_and_fails(tmp_path, capsys):
    from xdpo.cli import main

    code = main(["train", "--dry-run", "model.pretrained=./missing-pipeline", "loss.beta=-1"])
    text = capsys.readouterr().out
    assert code == 2
    assert "does not exist" in text and "data.path" in text and "loss.beta" in text
    assert "3 problem(s)" in text


def test_dry_run_fails_on_bad_rows_a_run_would_stop_on(tmp_path, tiny_pipeline_dir, make_pairs, capsys):
    import pyarrow.parquet as pq

    from xdpo.cli import main

    path = make_pairs(tmp_path / "p.parquet", n=6, n_ties=0)
    table = pq.read_table(path).to_pydict()
    table["label_0"][2] = 2.0
    import pyarrow as pa

    pq.write_table(pa.table(table), path)
    args = ["train", "--dry-run", f"model.pretrained={tiny_pipeline_dir}", f"data.path={path}"]
    assert main(args) == 2
    assert "row 2" in capsys.readouterr().out
    assert main([*args, "data.on_bad_row=skip"]) == 0


def _corrupt_pairs(path: Path, bad_row: int) -> Path:
    from xdpo.data import write_pairs_parquet

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(8)]
    images_1: list = list(imgs[4:])
    images_1[bad_row] = b"\xff\xd8\xff this is not a JPEG"
    return write_pairs_parquet(path, [f"c{i}" for i in range(4)], imgs[:4], images_1, [1.0, 0.0, 1.0, 0.0])


def test_check_data_finds_a_corrupt_image(tmp_path, capsys):
    from xdpo.cli import main

    path = _corrupt_pairs(tmp_path / "bad.parquet", bad_row=2)
    assert main(["check-data", f"data.path={path}", "model.pretrained=x/y"]) == 2
    text = capsys.readouterr().out
    assert "bad row 2" in text and "jpg_1" in text and "1 bad row(s) of 4" in text
    assert main(["check-data", f"data.path={path}", "model.pretrained=x/y", "data.on_bad_row=skip"]) == 0
    good = _corrupt_pairs(tmp_path / "good.parquet", bad_row=0)
    assert main(["check-data", f"data.path={good}", "model.pretrained=x/y"]) == 2  # row 0 now
    assert "bad row 0" in capsys.readouterr().out


def test_known_third_party_lines_are_dropped_and_others_kept(caplog):
    import logging

    import xdpo  # noqa: F401 - installs the filters

    diffusers_log = logging.getLogger("diffusers.models.modeling_utils")
    with caplog.at_level(logging.WARNING):
        diffusers_log.warning("There are modules in UNet that should be kept in float32: []. Casting ...")
        diffusers_log.warning("There are modules in T5 that should be kept in float32: ['wo']. Casting ...")
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
        )
        logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU ...")
        logging.getLogger("diffusers.pipelines.pipeline_utils").warning(
            "self.text_encoder_3=None of type <class 'NoneType'> cannot be saved."
        )
    assert [r.getMessage()[:40] for r in caplog.records] == ["There are modules in T5 that should be k"]
