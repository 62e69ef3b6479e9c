"""`xdpo demo`: the digits world end to end, in stages that each resume from what is on disk.

base (shipped) -> preference pairs (hidden labeller) -> train each method (the shipped digits configs)
-> reward-vs-step curves from the checkpoints -> same-seed samples of the final models (`xdpo sample`)
-> scores (`xdpo evaluate` scorers) -> report (report.py).
Two families: `sd` (the UNet base `digits`, Diffusion-DPO) and `flow` (its rectified-flow twin
`digits-flow`, an SD3 pipeline, Flow-DPO); each samples at its own defaults (`xdpo.apps.digits.digits_sampling`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Method:
    name: str  # row label in the report
    slug: str  # folder name
    config: str  # file in xdpo/configs
    overrides: tuple[str, ...] = ()


METHODS = (
    Method("Diffusion-DPO", "dpo", "digits-dpo.yaml"),
    Method("xDPO (Appendix C)", "xdpo", "digits-xdpo.yaml"),
    Method("xDPO (Eq. 9)", "xdpo-eq9", "digits-xdpo-eq9.yaml"),
    Method("SFT", "sft", "digits-sft.yaml"),
)
FLOW_METHODS = (  # the same methods on digits-flow; Flow-DPO = Diffusion-DPO's loss on velocity errors
    Method("Flow-DPO", "dpo", "digits-flow-dpo.yaml"),
    Method("xDPO (Appendix C)", "xdpo", "digits-flow-xdpo.yaml"),
    Method("xDPO (Eq. 9)", "xdpo-eq9", "digits-flow-xdpo-eq9.yaml"),
    Method("SFT", "sft", "digits-flow-sft.yaml"),
)
FAMILIES = {"sd": "digits", "flow": "digits-flow"}  # --family -> the named base model
DEFAULT_OUT = {"sd": "outputs/digits-demo", "flow": "outputs/digits-flow-demo"}
REF_UPDATE = ("reference.strategy=stable",)  # Kang et al.'s copy, the configs' pred_mse guard
TIMESTEP_AWARE = ("timesteps.sampling=skewed", "timesteps.weighting=snr")
ABLATION = (  # Kang et al. 2025, Tables 3-4
    Method("Diffusion-DPO", "dpo", "digits-dpo.yaml"),
    Method("+ reference update", "dpo-ref", "digits-dpo.yaml", REF_UPDATE),
    Method("+ timestep-aware", "dpo-ts", "digits-dpo.yaml", TIMESTEP_AWARE),
    Method("+ both", "dpo-both", "digits-dpo.yaml", REF_UPDATE + TIMESTEP_AWARE),
    Method(
        "+ reference update, tau 4, no guard",
        "dpo-ref-noguard",
        "digits-dpo.yaml",
        ("reference.strategy=stable", "reference.update_every=4", "reference.max_divergence=1e9"),
    ),
    Method("xDPO (Appendix C)", "xdpo", "digits-xdpo.yaml"),
    Method("xDPO + both", "xdpo-both", "digits-xdpo.yaml", REF_UPDATE + TIMESTEP_AWARE),
    Method("Diffusion-KTO", "kto", "digits-kto.yaml"),
    Method("SFT", "sft", "digits-sft.yaml"),
)


@dataclass
class DemoSettings:
    out: Path
    quick: bool = False
    ablation: bool = False
    n_pairs: int = 2000
    pair_seed: int = 0
    train_seeds: tuple[int, ...] = (0, 1)
    eval_seeds: int = 10  # seeds per held-out prompt for the final evaluation
    curve_seeds: int = 3  # seeds per held-out prompt for the reward-vs-step curves
    curve_points: int = 8  # checkpoints per run
    max_steps: int | None = None  # None: the configs' own
    methods: tuple[Method, ...] = METHODS
    family: str = "sd"  # sd: the UNet base; flow: digits-flow
    timings: dict[str, float] = field(default_factory=dict)
    task: str = (
        "bold"  # the preference evaluated (xdpo.apps.digits.tasks): its hidden reward scores the models
    )

    @property
    def base(self) -> str:
        """The named base model (`digits` or `digits-flow`)."""
        return FAMILIES[self.family]

    @classmethod
    def make(
        cls, out: str | Path, *, quick: bool = False, ablation: bool = False, family: str = "sd"
    ) -> DemoSettings:
        from xdpo.errors import ConfigError

        if family not in FAMILIES:
            raise ConfigError(f"--family: {family!r} is not one of {', '.join(FAMILIES)}")
        if ablation and family != "sd":
            raise ConfigError("--ablation: Kang et al.'s ablation is run on the UNet base only (--family sd)")
        methods = ABLATION if ablation else (FLOW_METHODS if family == "flow" else METHODS)
        if quick:
            return cls(
                Path(out),
                quick=True,
                ablation=ablation,
                n_pairs=128,
                train_seeds=(0,),
                eval_seeds=2,
                curve_seeds=1,
                curve_points=2,
                max_steps=30,
                methods=methods,
                family=family,
            )
        # the ablation trains 9 methods: one training seed keeps it near the demo's time (say so in the report)
        seeds = (0,) if ablation else (0, 1)
        # digits-flow samples and trains ~1.3x slower than the UNet base: half the pairs and 2 curve seeds
        # keep its full demo near the UNet demo's ~15 min on 2 cores
        flow = {"n_pairs": 1000, "curve_seeds": 2} if family == "flow" else {}
        return cls(Path(out), ablation=ablation, methods=methods, train_seeds=seeds, family=family, **flow)


def stage(name: str, settings: DemoSettings):
    """Context manager printing a stage line and recording its time."""
    from contextlib import contextmanager

    @contextmanager
    def _run():
        print(f"== {name}", flush=True)
        t0 = time.time()
        yield
        settings.timings[name] = round(time.time() - t0, 1)
        print(f"   {name}: {settings.timings[name]:.0f} s", flush=True)

    return _run()


def make_pairs_once(s: DemoSettings) -> Path:
    from xdpo.apps.digits.pairs import make_pairs, sidecar_path
    from xdpo.evaluate.pipeline import resolve_model

    path = s.out / "pairs.parquet"
    side = sidecar_path(path)
    if path.is_file() and side.is_file():
        rec = json.loads(side.read_text())
        same_model = rec.get("model") == str(resolve_model(s.base))
        if rec.get("n_pairs") == s.n_pairs and rec.get("seed") == s.pair_seed and same_model:
            print(f"   reusing {path}")
            return path
    make_pairs(path, s.n_pairs, seed=s.pair_seed, model=s.base, parts=s.out / "pairs.parts")
    return path


def run_config(s: DemoSettings, m: Method, seed: int, pairs: Path):
    from xdpo.config import load_config

    cfg = load_config(CONFIGS / m.config, [f"data.path={pairs}", f"seed={seed}", *m.overrides])
    if s.max_steps:
        cfg.train.max_steps = s.max_steps
        cfg.train.warmup_steps = min(cfg.train.warmup_steps, s.max_steps // 5)
    cfg.output_dir = str(s.out / "runs" / f"{m.slug}-s{seed}")
    cfg.train.checkpoint_every = max(1, cfg.train.max_steps // s.curve_points)
    cfg.train.checkpoints_keep = 0  # the curves read every checkpoint
    return cfg


def train_all(
    s: DemoSettings, pairs: Path, prepare: Callable[[Method, int, Any], None] | None = None
) -> dict[tuple[str, int], Path]:
    """Train every method x seed; a finished run is reused, an interrupted one resumed.
    `prepare(method, seed, cfg)`, if given, runs just before each run is trained (e.g. to seed its folder)."""
    from xdpo.train.checkpoint import list_checkpoints
    from xdpo.train.recipe import train

    runs = {}
    for m in s.methods:
        for seed in s.train_seeds:
            cfg = run_config(s, m, seed, pairs)
            out = Path(cfg.output_dir)
            runs[(m.slug, seed)] = out
            same = _same_config(out, cfg)
            if (out / "final" / "train_summary.json").is_file() and same:
                print(f"   {m.name} (seed {seed}): reusing {out}")
                continue
            if out.exists() and not same:  # the shipped config changed since this run: train it again
                shutil.rmtree(out)
            print(f"   {m.name} (seed {seed}): {cfg.train.max_steps} steps -> {out}", flush=True)
            if list_checkpoints(out):
                cfg.train.resume_from = "latest"
            if prepare is not None:
                prepare(m, seed, cfg)
            train(cfg)
    return runs


def _same_config(out: Path, cfg) -> bool:
    """Whether the run in `out` was made with `cfg` (ignoring resume_from)."""
    import copy

    import yaml

    from xdpo.config import to_dict
    from xdpo.models.load import check_pipeline
    from xdpo.train.setup import resolve_timesteps

    if not (out / "config.yaml").is_file():
        return False
    resolved = copy.deepcopy(cfg)  # train() writes config.yaml with timesteps.sampling=auto resolved
    resolve_timesteps(
        resolved, check_pipeline(cfg.model.pretrained, cfg.model.family, cfg.model.revision).process
    )
    old, new = yaml.safe_load((out / "config.yaml").read_text()), to_dict(resolved)
    old["train"]["resume_from"] = new["train"]["resume_from"] = ""
    return old == new


def eval_prompts_and_seeds(n_seeds: int, first_seed: int = 1000) -> tuple[list[str], list[int]]:
    from xdpo.apps.digits.data import eval_prompts

    return eval_prompts(), list(range(first_seed, first_seed + n_seeds))  # apart from the pairs' seeds


class SameSeedEvaluator:
    """Mean hidden reward and prompt alignment of a denoiser's samples at fixed (prompt, seed) noise.

    Loads a digits base once (`digits` by default, or `digits-flow`, or a folder); `score(denoiser)` swaps
    the denoiser in (`pipe.unet` or `pipe.transformer`), samples the held-out prompts at the model's own
    sampling settings and the same initial noise every time, and scores with the hidden labeller.
    """

    def __init__(
        self, n_seeds: int, model: str | Path | None = None, first_seed: int = 1000, task: str = "bold"
    ) -> None:
        import torch

        from xdpo.apps.digits.sampling import denoiser_name, load_pipeline
        from xdpo.apps.digits.tasks import get_task

        prompts, seeds = eval_prompts_and_seeds(n_seeds, first_seed)
        self.prompts = [p for sd in seeds for p in prompts]
        self.seeds = [sd for sd in seeds for _ in prompts]
        self.reward = get_task(task).reward  # the task's hidden reward (`bold`: labeller.hidden_reward)
        self.pipe = load_pipeline(model)
        self.attr = denoiser_name(self.pipe)
        self.base_denoiser = getattr(self.pipe, self.attr)
        c = self.base_denoiser.config
        shape = (c.in_channels, c.sample_size, c.sample_size)
        self.latents = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(sd)) for sd in seeds for _ in prompts]
        )

    def images(self, denoiser=None) -> list:
        """Samples of `denoiser` (None: the base) at the fixed (prompt, seed) noise, in `self.prompts` order."""
        from xdpo.apps.digits.sampling import generate
        from xdpo.models.families import family_of_pipeline

        setattr(self.pipe, self.attr, denoiser if denoiser is not None else self.base_denoiser)
        family_of_pipeline(self.pipe).prepare_sampling(self.pipe)  # as the loader did for the base
        try:
            return generate(self.pipe, self.prompts, latents=self.latents, progress=False)
        finally:
            setattr(self.pipe, self.attr, self.base_denoiser)

    def score(self, denoiser=None) -> tuple[float, float]:
        """Mean hidden reward (of the evaluator's task) and mean prompt alignment of `images(denoiser)`."""
        from xdpo.apps.digits.labeller import alignment

        images = self.images(denoiser)
        return float(np.mean(self.reward(images, self.prompts))), float(
            np.mean(alignment(images, self.prompts))
        )


CURVES_PARTIAL = "curves.partial.json"


def reward_curves(s: DemoSettings, runs: dict[tuple[str, int], Path]) -> dict[str, Any]:
    """Mean hidden reward of same-seed samples at every checkpoint of every run (step 0 = the base).

    Each scored checkpoint is kept in `curves.partial.json` at once (with its checkpoint's time), so an
    interrupted stage resumes at the first checkpoint not yet scored; a checkpoint written again (a run
    trained again) is scored again."""
    from xdpo.models.denoiser import load_denoiser
    from xdpo.train.checkpoint import list_checkpoints

    partial_path = s.out / CURVES_PARTIAL
    key = {"base": s.base, "curve_seeds": s.curve_seeds} | ({"task": s.task} if s.task != "bold" else {})
    partial = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
    if partial.get("key") != key:
        partial = {"key": key, "base": None, "points": {}}

    def keep() -> None:
        partial_path.write_text(json.dumps(partial, indent=2))

    ev = None
    if partial["base"] is None:
        ev = SameSeedEvaluator(s.curve_seeds, s.base, task=s.task)
        partial["base"] = list(ev.score())
        keep()
    base_reward, base_align = partial["base"]
    curves: dict[str, Any] = {"base": {"reward": base_reward, "alignment": base_align}, "runs": {}}
    for (slug, seed), out in runs.items():
        points, name = [(0, base_reward, base_align)], f"{slug}-s{seed}"
        for step, ckpt in list_checkpoints(out):
            stamp = f"{name}@{step}:{(ckpt / 'trainer_state.json').stat().st_mtime_ns}"
            if stamp not in partial["points"]:
                ev = ev or SameSeedEvaluator(s.curve_seeds, s.base, task=s.task)
                partial["points"][stamp] = list(ev.score(load_denoiser(ckpt)))
                keep()
            points.append((step, *partial["points"][stamp]))
        curves["runs"][name] = points
        print(f"   {slug} (seed {seed}): " + ", ".join(f"{st}:{r:.3f}" for st, r, _ in points), flush=True)
    (s.out / "curves.json").write_text(json.dumps(curves, indent=2))
    return curves


def sample_and_score(s: DemoSettings, runs: dict[tuple[str, int], Path]) -> dict[str, Any]:
    """`xdpo sample` the base and every final model at the same seeds and the base's sampling defaults
    (`sampling_defaults`: the digits plugin registers `digits` and `digits-flow`); score with the digits scorers."""
    from xdpo.apps.digits.tasks import get_task
    from xdpo.evaluate.evaluate import score_folder
    from xdpo.evaluate.pipeline import resolve_model, sampling_defaults
    from xdpo.evaluate.sample import sample_images
    from xdpo.evaluate.scorers import load_scorers

    prompts, seeds = eval_prompts_and_seeds(s.eval_seeds)
    scorer = get_task(s.task).scorer  # `digits-reward` for `bold`
    scorers = load_scorers(f"{scorer},digits-alignment")
    sampling = sampling_defaults(s.base)
    models = {"base": resolve_model(s.base)} | {
        f"{slug}-s{seed}": out / "final" for (slug, seed), out in runs.items()
    }
    tables = {}
    for name, model in models.items():
        folder = s.out / "samples" / name
        if not (folder / "manifest.jsonl").is_file() or _stale(folder, model):
            sample_images(
                model,
                prompts,
                seeds,
                out_dir=folder,
                steps=sampling["steps"],
                guidance=sampling["guidance"],
                scheduler=sampling["scheduler"],
                batch_size=128,
                progress=False,
                resume=not _stale(folder, model, folder / "manifest.jsonl.tmp"),  # finished batches kept
            )
        tables[name] = score_folder(folder, scorers, progress=False)
        if scorer != "digits-reward":  # the reports read the task's hidden reward under one column name
            tables[name]["digits-reward"] = tables[name].pop(scorer)
        print(f"   {name}: mean hidden reward {tables[name]['digits-reward'].mean():.3f}", flush=True)
    return tables


def _stale(folder: Path, model: Path, manifest: Path | None = None) -> bool:
    """Re-sample when the model was written after the samples (a run that was trained again)."""
    manifest = manifest or folder / "manifest.jsonl"
    if not manifest.is_file():
        return True
    newest = max((p.stat().st_mtime for p in Path(model).rglob("*.safetensors")), default=0.0)
    return newest > manifest.stat().st_mtime


def run_demo(
    out: str | Path,
    *,
    quick: bool = False,
    ablation: bool = False,
    family: str = "sd",
    settings: DemoSettings | None = None,
) -> Path:
    """Run (or continue) the demo of `family` (sd or flow) into `out` (or as `settings` say); return the report
    path."""
    from xdpo.apps.demo.report import write_report

    s = settings or DemoSettings.make(out, quick=quick, ablation=ablation, family=family)
    family = s.family
    s.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = "the digits base" if family == "sd" else f"the {s.base} base"
    with stage(f"1/5 preference pairs from {base} (hidden labeller)", s):
        pairs = make_pairs_once(s)
    with stage("2/5 training", s):
        runs = train_all(s, pairs)
    with stage("3/5 reward-vs-step curves", s):
        curves = reward_curves(s, runs)
    with stage("4/5 sampling and scoring the final models", s):
        tables = sample_and_score(s, runs)
    with stage("5/5 report", s):
        report = write_report(s, pairs, runs, curves, tables)
    print(f"Demo finished in {time.time() - t0:.0f} s. Report: {report}", flush=True)
    return report
