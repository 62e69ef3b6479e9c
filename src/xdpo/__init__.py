"""xdpo: preference fine-tuning of text-to-image diffusion models (xDPO, Diffusion-DPO, ...)."""

__version__ = "0.1.0"
