"""Model loading: diffusers components, LoRA, prediction targets, tokenizers, small components and tiny test pipelines."""
