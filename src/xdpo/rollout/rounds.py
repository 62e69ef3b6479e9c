"""Online DPO's rounds: every `online.every` optimizer steps, new pairs from the current policy.

Round r covers steps [r * E, (r + 1) * E). At its start every process samples K = `online.per_prompt`
images for its share of `online.prompts` with the current policy (seed = f(seed, r), recorded per
image), scores them with `online.scorer` (any `xdpo pairs` reward), keeps best-vs-worst pairs (or
every pair whose gap exceeds `online.min_gap`), and the run trains on them for E steps. This is
Diffusion-DPO's AI-feedback setting (§5.4) made on-policy, as flow_grpo's online DPO; the reference
strategy decides what the reference is. Round files `output_dir/online/round-NNNN.parquet` are kept, so a
resumed run trains on exactly the pairs it had (resume is exact across rounds).

Sampling runs in the accelerator's autocast (the policy is bf16/fp16 under mixed precision; the VAE
decodes in its own dtype), and under `no_grad` rather than inference mode when the model is partitioned
(FSDP2, ZeRO-3): parameters gathered inside inference mode would become inference tensors that the
training step cannot update or save for backward.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from xdpo.errors import ConfigError
from xdpo.train.batches import mix_seed
from xdpo.train.distributed import is_partitioned
from xdpo.train.online import round_file


class PairRounds:
    """The round maker of online DPO (`xdpo.train.sources.RoundMaker`)."""

    def __init__(self, cfg: Any, comps: Any, accelerator: Any, out: Path, reward: Any = None) -> None:
        """`reward`: the scorer (default: `online.scorer`, loaded as `xdpo pairs --scorer` loads it)."""
        from xdpo.pairs.scoring import load_reward

        self.cfg, self.comps, self.accelerator, self.out = cfg, comps, accelerator, Path(out)
        self.reward = reward or load_reward(cfg.online.scorer, device=str(accelerator.device))

    def __call__(self, r: int, model: Any) -> Path:
        """Round r's pairs from the current policy (`model`, unwrapped); reused when the file exists."""
        path = round_file(self.out, r)
        if path.is_file():
            return path
        acc = self.accelerator
        cols = self._sample(r, model)
        part = path.with_name(f"{path.stem}.part{acc.process_index}.parquet")
        part.parent.mkdir(parents=True, exist_ok=True)
        if cols.get("caption"):
            from xdpo.pairs.generate import write_columns

            write_columns(part, cols)
        acc.wait_for_everyone()
        if acc.is_main_process:
            from xdpo.pairs.generate import merge_parts

            parts = sorted(path.parent.glob(f"{path.stem}.part*.parquet"))
            try:
                merge_parts(parts, path)
            except ConfigError as e:
                raise ConfigError(f"online.enabled: round {r}: {e}") from None
            for p in parts:
                p.unlink()
        acc.wait_for_everyone()
        return path

    def _sample(self, r: int, model: Any) -> dict[str, list]:
        from xdpo.evaluate.prompts import resolve_prompt_records
        from xdpo.evaluate.sample import sampling_defaults
        from xdpo.pairs.generate import sample_and_pair

        cfg, comps, acc, o = self.cfg, self.comps, self.accelerator, self.cfg.online
        rank, world = acc.process_index, acc.num_processes
        records = resolve_prompt_records(o.prompts)
        mine: list[int | None] = list(range(rank, len(records), world))
        partitioned = is_partitioned(acc)
        if partitioned:  # forwards are collectives: as many sampling calls on every process
            mine += [None] * (-(-len(records) // world) - len(mine))
        defaults = sampling_defaults(cfg.model.pretrained)
        fam = comps.family
        pipe = fam.pipeline_cls()(**{**comps.pipe.components, fam.denoiser: model})
        if fam.process == "ddpm" and defaults["scheduler"] == "ddim":
            from diffusers import DDIMScheduler

            pipe.scheduler = DDIMScheduler.from_config(comps.pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        was_training = model.training
        model.eval()
        cols: dict[str, list] = {}
        try:
            seed = mix_seed(cfg.seed, r, 0x0DE) % (2**31)
            for i in mine:  # one prompt at a time: global prompt index i, seeds seed + i * K + k
                got = sample_and_pair(
                    pipe, [records[i or 0]], per_prompt=o.per_prompt, reward=self.reward, seed=seed,
                    first_index=i or 0, min_gap=o.min_gap,
                    steps=o.sample_steps or defaults["steps"], guidance=defaults["guidance"],
                    batch_size=o.per_prompt, sampling=lambda: _sampling(acc, partitioned),
                )  # fmt: skip
                for k, v in got.items() if i is not None else ():  # (None: a padding call, discarded)
                    cols.setdefault(k, []).extend(v)
        finally:
            if was_training:
                model.train()
            torch.set_grad_enabled(True)
        return cols


@contextmanager
def _sampling(accelerator: Any, partitioned: bool):
    """No autograd (no_grad for partitioned models, else inference mode) and the run's autocast."""
    with (torch.no_grad if partitioned else torch.inference_mode)(), accelerator.autocast():
        yield
