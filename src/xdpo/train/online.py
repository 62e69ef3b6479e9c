"""Online (iterative) DPO: every `train.online_every` optimizer steps, new pairs from the current policy.

Round r covers steps [r * E, (r + 1) * E). At its start every process samples K = `train.online_per_prompt`
images for its share of `train.online_prompts` with the current policy (seed = f(seed, r), recorded per
image), scores them with `train.online_scorer` (any `xdpo pairs` reward), keeps best-vs-worst pairs (or
every pair whose gap exceeds `train.online_min_gap`), and the run trains on them for E steps. This is
Diffusion-DPO's AI-feedback setting (§5.4) made on-policy, as flow_grpo's online DPO; the reference
strategy decides what the reference is (`reference.strategy=periodic` with `update_every = E` moves it
with the rounds). Round files `output_dir/online/round-NNNN.parquet` are kept, so a resumed run trains on
exactly the pairs it had (resume is exact across rounds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xdpo.errors import ConfigError
from xdpo.train.batches import mix_seed
from xdpo.train.distributed import is_partitioned


def round_file(out: Path, r: int) -> Path:
    return out / "online" / f"round-{r:04d}.parquet"


def make_round(cfg: Any, comps: Any, model: Any, reward: Any, out: Path, r: int, accelerator: Any) -> Path:
    """Round r's pairs from the current policy (`model`, unwrapped); reused when the file exists."""
    import torch

    from xdpo.evaluate.prompts import resolve_prompt_records
    from xdpo.evaluate.sample import sampling_defaults
    from xdpo.pairs.generate import merge_parts, sample_and_pair, write_columns

    path = round_file(out, r)
    if path.is_file():
        return path
    t = cfg.train
    rank, world = accelerator.process_index, accelerator.num_processes
    records = resolve_prompt_records(t.online_prompts)
    mine = list(range(rank, len(records), world))
    partitioned = is_partitioned(accelerator)
    if partitioned:  # forwards are collectives: as many sampling calls on every process
        mine += [None] * (-(-len(records) // world) - len(mine))
    defaults = sampling_defaults(cfg.model.pretrained)
    pipe = comps.family.pipeline_cls()(**{**comps.pipe.components, comps.family.denoiser: model})
    if comps.family.process == "ddpm" and defaults["scheduler"] == "ddim":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(comps.pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    was_training = model.training
    model.eval()
    parts = []
    try:
        seed = mix_seed(cfg.seed, r, 0x0DE) % (2**31)
        cols: dict[str, list] = {}
        for i in mine:  # one prompt at a time: global prompt index i, seeds seed + i * K + k
            got = sample_and_pair(
                pipe, [records[i or 0]], per_prompt=t.online_per_prompt, reward=reward, seed=seed,
                first_index=i or 0,
                min_gap=t.online_min_gap, steps=t.online_sample_steps or defaults["steps"],
                guidance=defaults["guidance"], batch_size=t.online_per_prompt,
                no_grad=torch.no_grad if partitioned else torch.inference_mode,  # (as the step's reference)
            )  # fmt: skip
            for k, v in got.items() if i is not None else ():  # (None: a padding call, discarded)
                cols.setdefault(k, []).extend(v)
        part = path.with_name(f"{path.stem}.part{rank}.parquet")
        part.parent.mkdir(parents=True, exist_ok=True)
        if cols.get("caption"):
            write_columns(part, cols)
    finally:
        if was_training:
            model.train()
        torch.set_grad_enabled(True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = sorted(path.parent.glob(f"{path.stem}.part*.parquet"))
        try:
            merge_parts(parts, path)
        except ConfigError as e:
            raise ConfigError(f"train.online: round {r}: {e}") from None
        for p in parts:
            p.unlink()
    accelerator.wait_for_everyone()
    return path


def round_pairs(cfg: Any, path: Path) -> Any:
    """Round pairs as a PreferencePairs dataset with the run's data settings."""
    from xdpo.data import PreferencePairs, load_preference_table

    d = cfg.data
    return PreferencePairs(
        load_preference_table(str(path)), resolution=d.resolution, ties=d.ties, flip=d.flip,
        random_crop=d.random_crop, prompt_dropout=d.prompt_dropout, source=str(path),
    )  # fmt: skip


def stream(cfg: Any, first: tuple[int, Any], make: Any, loader: Any, start_step: int) -> Any:
    """Micro-batches from `start_step` to the end, round by round: round r's pairs come from `make(r)`
    (called when the round's first batch is needed, i.e. with the policy as it is then), read in the
    order `loader(pairs, seed, start, stop)` gives (a pure function of the round's seed and local step)."""
    from xdpo.train.batches import mix_seed

    every, total = cfg.train.online_every, cfg.train.max_steps
    r, pairs = first
    step = start_step
    while step < total:
        stop = min((r + 1) * every, total)
        yield from loader(pairs, mix_seed(cfg.seed, r), step - r * every, stop - r * every)
        step, r = stop, r + 1
        if step < total:
            pairs = make(r)
