"""Model loading: diffusers components, LoRA, prediction targets, tokenizers, tiny test pipelines."""
