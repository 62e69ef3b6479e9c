"""xdpo: preference fine-tuning of text-to-image diffusion models (xDPO, Diffusion-DPO, ...)."""

from xdpo.objectives import LossOutput, preference_loss

__version__ = "0.1.0"
__all__ = ["LossOutput", "preference_loss", "__version__"]
