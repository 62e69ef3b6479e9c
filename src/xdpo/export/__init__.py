"""`xdpo export`: a trained model in the formats people load it with, its model card, and the hub.

- `lora.py`: LoRA weights as diffusers/peft (`pytorch_lora_weights.safetensors`, what `load_lora_weights`
  reads) and kohya/ComfyUI naming with alpha (`<name>.kohya.safetensors`; SD, SDXL, Flux), and the LoRA
  merged into whole weights (`merged/`, a full pipeline folder);
- `hub.py`: `--push-to-hub REPO` through `huggingface_hub`, one line when offline;
- `cli.py`: the command. The model card is `xdpo.train.card`'s, the one every run writes into `final/`.
"""
