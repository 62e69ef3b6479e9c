"""Shared test setup: offline Hugging Face, one torch thread, tiny pipelines and Pick-a-Pic fixtures.

One torch thread: these machines have 2 shared cores, and a second thread next to another busy
process slows tiny workloads by orders of magnitude (docs/design.md §7). The `datasets` cache goes to a
temporary folder so tests never touch (or depend on) the user's cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "HF_DATASETS_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="xdpo-tests-datasets-")
    os.environ["HF_DATASETS_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

BRIGHT, DARK = 60.0, -60.0
"""Brightness offsets of winners and losers in `make_pairs_parquet` (ties get 0 on both sides)."""


def _texture(rng: np.random.Generator, size: tuple[int, int], offset: float) -> Image.Image:
    """A smooth random RGB texture of `size` = (width, height), shifted in brightness by `offset`."""
    w, h = size
    coarse = rng.uniform(40, 215, size=(max(h // 6, 2), max(w // 6, 2), 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
    arr = np.clip(np.asarray(img, dtype=np.float32) + offset, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_pairs_parquet(
    path: str | Path, n: int = 12, size: tuple[int, int] = (40, 36), seed: int = 0, n_ties: int = 1
) -> Path:
    """A small Pick-a-Pic-schema parquet whose preference is learnable: the winner is brighter.

    Rows alternate label_0 = 1 / 0 (winner in jpg_0 / jpg_1); `n_ties` rows at random positions
    have label_0 = 0.5 and two images of equal mean brightness. `size` is (width, height). Extra
    columns `best_image_uid` (str) and `brightness_0` (the offset applied to jpg_0) are ignored by readers.
    """
    from xdpo.data import write_pairs_parquet

    if not 0 <= n_ties <= n:
        raise ValueError(f"n_ties must be in [0, n], got {n_ties}")
    rng = np.random.default_rng(seed)
    tie_rows = set(rng.choice(n, size=n_ties, replace=False).tolist())
    captions, images_0, images_1, labels, uids, offsets = [], [], [], [], [], []
    k = 0
    for row in range(n):
        if row in tie_rows:
            label, off_0, off_1 = 0.5, 0.0, 0.0
        else:
            label = 1.0 if k % 2 == 0 else 0.0
            off_0, off_1 = (BRIGHT, DARK) if label == 1.0 else (DARK, BRIGHT)
            k += 1
        captions.append(f"a bright picture, number {row}")
        images_0.append(_texture(rng, size, off_0))
        images_1.append(_texture(rng, size, off_1))
        labels.append(label)
        uids.append(f"uid-{row}-{'tie' if label == 0.5 else int(1 - label)}")
        offsets.append(off_0)
    return write_pairs_parquet(
        path, captions, images_0, images_1, labels, extra={"best_image_uid": uids, "brightness_0": offsets}
    )


@pytest.fixture(scope="session")
def make_pairs():
    """`make_pairs_parquet` as a fixture (for tests that want variants)."""
    return make_pairs_parquet


@pytest.fixture(scope="session")
def pairs_parquet(tmp_path_factory) -> Path:
    """12 rows of 40 x 36 px pairs (one tie), winner brighter; both label orders present."""
    return make_pairs_parquet(tmp_path_factory.mktemp("pairs") / "pairs.parquet")


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory) -> Path:
    """The real CLIP tokenizer, built once per session."""
    from xdpo.models.tokenizer import build_clip_tokenizer

    out = tmp_path_factory.mktemp("clip_tokenizer")
    build_clip_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory, clip_tokenizer_dir) -> Path:
    """A tiny random SD pipeline (epsilon prediction, 32 x 32 px images, latents 4 x 16 x 16)."""
    from xdpo.models.small import build_pipeline

    return build_pipeline(
        "StableDiffusionPipeline", tmp_path_factory.mktemp("tiny_sd"), tokenizer_dir=clip_tokenizer_dir
    )


@pytest.fixture(scope="session")
def tiny_pipeline_v_dir(tmp_path_factory, clip_tokenizer_dir) -> Path:
    """As `tiny_pipeline_dir` with `prediction_type="v_prediction"`."""
    from xdpo.models.small import build_pipeline

    return build_pipeline(
        "StableDiffusionPipeline",
        tmp_path_factory.mktemp("tiny_sd_v"),
        prediction_type="v_prediction",
        tokenizer_dir=clip_tokenizer_dir,
    )


# ---- tiny pipelines of the other families (xdpo.models.small): latents 8 x 8, images 16 x 16 px ----


@pytest.fixture(scope="session")
def t5_tokenizer_dir(tmp_path_factory) -> Path:
    """A small T5 tokenizer (Unigram, T5's special tokens), built once per session."""
    from xdpo.models.tokenizer import build_t5_tokenizer

    out = tmp_path_factory.mktemp("t5_tokenizer")
    build_t5_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline_dir(tmp_path_factory, clip_tokenizer_dir) -> Path:
    """A tiny random SDXL pipeline (CLIP-L + CLIP-G, text_time UNet, Euler; 16 x 16 px images)."""
    from xdpo.models.small import build_pipeline

    return build_pipeline(
        "StableDiffusionXLPipeline", tmp_path_factory.mktemp("tiny_sdxl"), tokenizer_dir=clip_tokenizer_dir
    )


@pytest.fixture(scope="session")
def tiny_sd3_pipeline_dir(tmp_path_factory, clip_tokenizer_dir, t5_tokenizer_dir) -> Path:
    """A tiny random SD3 pipeline with T5 (MMDiT, flow matching with shift 3; 16 x 16 px images)."""
    from xdpo.models.small import build_pipeline

    return build_pipeline(
        "StableDiffusion3Pipeline",
        tmp_path_factory.mktemp("tiny_sd3"),
        tokenizer_dir=clip_tokenizer_dir,
        t5_tokenizer_dir=t5_tokenizer_dir,
    )


@pytest.fixture(scope="session")
def tiny_flux_pipeline_dir(tmp_path_factory, clip_tokenizer_dir, t5_tokenizer_dir) -> Path:
    """A tiny random FLUX.1-dev-like pipeline (guidance embedding, dynamic shifting; 16 x 16 px images)."""
    from xdpo.models.small import build_pipeline

    return build_pipeline(
        "FluxPipeline",
        tmp_path_factory.mktemp("tiny_flux"),
        tokenizer_dir=clip_tokenizer_dir,
        t5_tokenizer_dir=t5_tokenizer_dir,
    )


@pytest.fixture(scope="session")
def tiny_flux_schnell_pipeline_dir(tmp_path_factory, clip_tokenizer_dir, t5_tokenizer_dir) -> Path:
    """As `tiny_flux_pipeline_dir` without the guidance embedding (FLUX.1-schnell-like)."""
    from xdpo.models.small import build_pipeline

    return build_pipeline(
        "FluxPipeline",
        tmp_path_factory.mktemp("tiny_flux_schnell"),
        guidance_embeds=False,
        tokenizer_dir=clip_tokenizer_dir,
        t5_tokenizer_dir=t5_tokenizer_dir,
    )


# ---- the one training harness -------------------------------------------------------------------
TRAIN_DEFAULTS = {
    "data.resolution": 32,
    "train.max_steps": 3,
    "train.batch_size": 2,
    "train.learning_rate": 1e-3,
    "train.scale_lr": False,
    "train.warmup_steps": 0,
    "train.checkpoint_every": 0,
    "loss.beta": 100.0,
}
"""A short, fast, learnable run on a tiny pipeline; tests override what they exercise."""


def train_overrides(out: Path, pipe: Path | str, pairs: Path | str, **overrides) -> list[str]:
    """`key=value` overrides of a test run (TRAIN_DEFAULTS, then `overrides` with dotted keys)."""
    values = {"output_dir": str(out), "model.pretrained": str(pipe), "data.path": str(pairs)}
    values |= TRAIN_DEFAULTS | overrides
    return [f"{k}={v}" for k, v in values.items()]


def torchrun_cmd(command: str, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node 2 -m xdpo COMMAND ARGS...` (2 CPU processes over gloo)."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: two such runs (parallel test workers) never share one
        "--nproc_per_node",
        "2",
        "-m",
        "xdpo",
        command,
        *args,
    ]


def torchrun(command: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `torchrun_cmd` with one thread per process, offline; fail with its output's tail; return it."""
    import subprocess

    full_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        torchrun_cmd(command, *args), capture_output=True, text=True, timeout=600, env=full_env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (fixed by a process's first `Accelerator`, mixed precision
    included), as accelerate's own `AccelerateTestCase` does after each test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def any_precision():
    """A test whose runs set `train.mixed_precision`: accelerate's state is reset before and after it (and
    the test resets it between runs of different precisions), so no other test inherits a precision."""
    reset_accelerate_state()
    yield reset_accelerate_state
    reset_accelerate_state()


INK_REWARD = (
    "import numpy as np\n"
    "def ink(images, prompts):\n"
    "    return [float(np.asarray(im.convert('L'), dtype=np.float64).mean()) for im in images]\n"
)
"""A reward plugin module (`rewards:ink` once written as rewards.py): the mean grey level."""


def online_args(folder: Path) -> tuple[list[str], dict[str, str]]:
    """Overrides and environment of an online run on a tiny pipeline launched as processes: rounds of 2 steps,
    2 prompts, 2 images each in 2 sampling steps, scored by `rewards:ink` (written into `folder`, which the
    environment's PYTHONPATH adds)."""
    (folder / "rewards.py").write_text(INK_REWARD)
    (folder / "prompts.txt").write_text("a red square\na blue circle\n")
    args = ["data.path=", "online.enabled=true", "online.every=2", f"online.prompts={folder / 'prompts.txt'}",
            "online.scorer=rewards:ink", "online.per_prompt=2", "online.sample_steps=2"]  # fmt: skip
    return args, {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def run_training(out: Path, pipe: Path | str, pairs: Path | str, **overrides) -> Path:
    """`xdpo.train.recipe.train` on a test config; returns output_dir."""
    from xdpo.config import load_config
    from xdpo.train.recipe import train

    return train(load_config(None, train_overrides(out, pipe, pairs, **overrides)))


@pytest.fixture
def train_run(tmp_path, tiny_pipeline_dir, pairs_parquet):
    """`train_run(name, **overrides)`: a run on the tiny SD pipeline and the pairs fixture in tmp_path/name."""

    def run(name: str = "run", **overrides) -> Path:
        return run_training(tmp_path / name, tiny_pipeline_dir, pairs_parquet, **overrides)

    return run


# ---- tiny Qwen-Image, FLUX.2 (dev, klein), Z-Image and Wan pipelines (xdpo.models.small.recent_pipelines) ----
RECENT_PIPELINES = {
    "qwenimage": "QwenImagePipeline",
    "flux2": "Flux2Pipeline",
    "flux2_klein": "Flux2KleinPipeline",
    "zimage": "ZImagePipeline",
    "wan": "WanPipeline",
}
"""Family name -> pipeline class of the tiny pipelines below (fixture `tiny_<family>_pipeline_dir`)."""


def _recent(name: str):
    @pytest.fixture(scope="session")
    def fixture(tmp_path_factory, t5_tokenizer_dir) -> Path:
        from xdpo.models.small import build_pipeline

        return build_pipeline(
            RECENT_PIPELINES[name], tmp_path_factory.mktemp(f"tiny_{name}"), t5_tokenizer_dir=t5_tokenizer_dir
        )

    fixture.__doc__ = f"A tiny random {RECENT_PIPELINES[name]} (xdpo.models.small.recent_pipelines)."
    return fixture


tiny_qwenimage_pipeline_dir = _recent("qwenimage")
tiny_flux2_pipeline_dir = _recent("flux2")
tiny_flux2_klein_pipeline_dir = _recent("flux2_klein")
tiny_zimage_pipeline_dir = _recent("zimage")
tiny_wan_pipeline_dir = _recent("wan")


def make_clip(offset: float, frames: int, size: int = 40, seed: int = 0) -> list[np.ndarray]:
    """A smooth random RGB clip (uint8 [size, size, 3] frames) moving one pixel a frame, brightness + offset."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(40, 215, size=(8, 8, 3)).astype(np.uint8)
    out = []
    for k in range(frames):
        img = Image.fromarray(np.roll(base, k, axis=1)).resize((size, size), Image.Resampling.BILINEAR)
        out.append(np.clip(np.asarray(img, dtype=np.float32) + offset, 0, 255).astype(np.uint8))
    return out


def make_clip_pairs_parquet(
    folder: Path, n: int = 6, frames: tuple[int, ...] = (5, 2), fps: float = 8
) -> Path:
    """`n` pairs of mp4 clips (paths next to `folder/clips.parquet`), the winner brighter, labels alternating;
    clip lengths cycle through `frames` (a 2-frame clip is shorter than 5 sampled frames: it holds its last)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xdpo.data.video import write_video

    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for i in range(n):
        label, k = float(i % 2 == 0), frames[i % len(frames)]
        bright, dark = make_clip(BRIGHT, k, seed=2 * i), make_clip(DARK, k, seed=2 * i + 1)
        for j, clip in enumerate((bright, dark) if label else (dark, bright)):
            write_video(clip, folder / f"clip{i}_{j}.mp4", fps)
            rows[f"jpg_{j}"].append(f"clip{i}_{j}.mp4")
        rows["caption"].append(f"a bright clip, number {i}")
        rows["label_0"].append(label)
    path = folder / "clips.parquet"
    pq.write_table(pa.table(rows), path)
    return path


@pytest.fixture(scope="session")
def clip_pairs_parquet(tmp_path_factory) -> Path:
    """6 pairs of 40 x 40 px mp4 clips at 8 fps (5 and 2 frames), winner brighter."""
    return make_clip_pairs_parquet(tmp_path_factory.mktemp("clips"))
