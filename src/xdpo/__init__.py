"""xdpo: preference fine-tuning of text-to-image diffusion models (xDPO, Diffusion-DPO, ...).

`from xdpo import preference_loss` gives the objective as a pure function of per-sample errors;
torch is imported on first use, so `xdpo --help` starts quickly.
"""

import logging
from typing import Any

# bitsandbytes (for train.optimizer=adamw8bit) warns on import on some CPUs about an optional 4-bit
# kernel xdpo never uses; diffusers and peft import it whenever it is installed.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["LossOutput", "preference_loss", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("preference_loss", "LossOutput"):
        from xdpo import objectives

        return getattr(objectives, name)
    raise AttributeError(f"module 'xdpo' has no attribute {name!r}")
