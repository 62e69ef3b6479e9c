"""benchmarks/real_shapes.py's CPU path at tiny shapes: every model's step runs through xdpo's train_step on the
cache path (its family's latents, packing and predict) to a finite loss, one line per model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_shapes.py"


def test_real_shapes_runs_every_model_at_tiny_shapes(capsys):
    spec = importlib.util.spec_from_file_location("real_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--steps", "1"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "s/step" in x or "failed" in x]
    assert [x.split("  ")[0].strip() for x in lines] == [run[0] for run in module.RUNS]
    assert not any("failed" in x for x in lines)
    assert module.FLUX2_DEV["joint_attention_dim"] == 3 * 5120 and module.QWEN_IMAGE["num_layers"] == 60
