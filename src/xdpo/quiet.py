"""Known third-party log lines that say nothing to an xdpo user, dropped at their loggers (nothing imported).

- diffusers' "should be kept in float32: []" on every `.to(dtype)` of a model that keeps no module in fp32
  (diffusers 0.42 warns for an empty list too); a non-empty list still shows;
- transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ...Pil": the
  PIL processor is what xdpo means to use (the safety checker's feature extractor is never called);
- DeepSpeed's "Setting accelerator to CPU" (printed on import, in the middle of a progress bar) in runs that
  do not use DeepSpeed (`accelerate launch` with a DeepSpeed config still shows it);
- diffusers' "text_encoder_3=None of type <class 'NoneType'> cannot be saved" when a pipeline saves a
  component that was left out on purpose (SD3 without T5): a None component is saved as null, as meant;
- bitsandbytes' CPU-kernel notice (an optional 4-bit kernel xdpo never needs).
Weight-loading progress bars are turned off where xdpo loads a pipeline (`xdpo.models.load`).
"""

from __future__ import annotations

import logging
import os


class _Drop(logging.Filter):
    def __init__(self, *fragments: str, unless_env: str = "") -> None:
        super().__init__()
        self.fragments, self.unless_env = fragments, unless_env

    def filter(self, record: logging.LogRecord) -> bool:
        if self.unless_env and os.environ.get(self.unless_env, "").lower() in ("1", "true", "yes"):
            return True
        text = record.getMessage()
        return not any(f in text for f in self.fragments)


FILTERS = {
    "diffusers.models.modeling_utils": _Drop("should be kept in float32: []"),
    "transformers.utils.import_utils": _Drop("requires torchvision (not installed); falling back to"),
    "diffusers.pipelines.pipeline_utils": _Drop("=None of type <class 'NoneType'> cannot be saved"),
    "DeepSpeed": _Drop("Setting accelerator to CPU", unless_env="ACCELERATE_USE_DEEPSPEED"),
}


def install() -> None:
    """Add the filters (once) and quiet bitsandbytes' CPU-kernel notice."""
    for name, f in FILTERS.items():
        logger = logging.getLogger(name)
        if f not in logger.filters:
            logger.addFilter(f)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def progress_bars_off():
    """A context in which diffusers' and transformers' loading bars ("Loading pipeline components",
    "Loading weights", "Writing model shards") stay off; restored after."""
    from contextlib import contextmanager

    @contextmanager
    def _off():
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
        try:
            yield
        finally:
            if was[0]:
                dlog.enable_progress_bar()
            if was[1]:
                tlog.enable_progress_bar()

    return _off()
