"""xdpo: preference fine-tuning of text-to-image diffusion models (xDPO, Diffusion-DPO, ...).

`from xdpo import preference_loss` gives the objective as a pure function of per-sample errors;
torch is imported on first use, so `xdpo --help` starts quickly.
"""

from typing import Any

from xdpo import quiet

quiet.install()  # known third-party log lines (xdpo.quiet), dropped at their loggers

__version__ = "0.1.0"
__all__ = ["LossOutput", "preference_loss", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("preference_loss", "LossOutput"):
        from xdpo import objectives

        return getattr(objectives, name)
    raise AttributeError(f"module 'xdpo' has no attribute {name!r}")
