"""Quantised frozen bases for LoRA training (`model.quantize`, `model.quantize_text_encoders`).

Every `torch.nn.Linear` of a frozen model is replaced by a quantised layer holding its weight in fewer
bits; convolutions, norms and embeddings keep the mixed-precision dtype. LoRA adapters (peft) then wrap
the quantised layers: peft's own bitsandbytes LoRA layers for int8 and nf4 (the model is marked
`is_loaded_in_8bit` / `is_loaded_in_4bit`, as transformers and diffusers mark a model loaded quantised),
its plain `Linear` LoRA layer for fp8. The reference of a LoRA run is the same model with its adapters
off, so it shares the quantised base.

- int8: bitsandbytes `Linear8bitLt` (LLM.int8 weights, Dettmers et al. 2022; threshold 0: no fp16 outlier
  columns), 1 byte per weight + one fp32 scale per output row;
- nf4: bitsandbytes `Linear4bit` (QLoRA's NormalFloat4, Dettmers et al. 2023), 1/2 byte per weight + one
  absmax per block of 64 (8 bits: double quantisation);
- fp8: torch's float8 e4m3 storage with one scale per output row (`Float8Linear`: scale = max |w_row| / 448,
  the e4m3 maximum), dequantised to the input's dtype at each call; 1 byte per weight. Runs wherever torch
  has float8 tensors (CPU included); bitsandbytes has no fp8 storage, and torchao's float8 needs CUDA.
bitsandbytes (>= 0.45) runs both on CUDA and on the CPU (the `bnb` extra).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from xdpo.errors import ConfigError

MODES = ("none", "int8", "nf4", "fp8")
E4M3_MAX = 448.0
BYTES_PER_WEIGHT = {"int8": 1.0, "nf4": 0.5 + 1 / 64, "fp8": 1.0}
"""Bytes per quantised Linear weight, block scales included (nf4: one 8-bit absmax per block of 64, the
absmax themselves quantised: QLoRA's double quantisation); int8 adds an fp32 scale per row, fp8 a scale
per row in the model's dtype (counted by `quantized_bytes`)."""


class Float8Linear(torch.nn.Linear):
    """A Linear layer whose weight is stored in float8 e4m3 (as raw bytes, so `.to(dtype)` leaves it as it
    is) with one scale per output row; `weight` is the dequantised weight in the scale's dtype."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
        q = (w / scale).to(torch.float8_e4m3fn)
        self.register_buffer("weight_fp8", q.view(torch.uint8))
        self.register_buffer("weight_scale", scale.to(linear.weight.dtype))
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.weight_fp8.view(torch.float8_e4m3fn).to(self.weight_scale.dtype) * self.weight_scale

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_fp8.view(torch.float8_e4m3fn).to(x.dtype) * self.weight_scale.to(x.dtype)
        return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def _bnb_linear(linear: torch.nn.Linear, mode: str, dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=0.0
        )
        q.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype, quant_type="nf4"
        )
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    if bias:
        q.bias = torch.nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    return q


def quantize_model(
    model: Any, mode: str, device: torch.device | str, dtype: torch.dtype, key: str = "model.quantize"
) -> int:
    """Replace every Linear of `model` (frozen) by its `mode` quantised form on `device`, the rest of the
    model in `dtype`; returns how many layers were quantised. Modules the model keeps in fp32
    (transformers' `_keep_in_fp32_modules`, e.g. T5's `wo`) stay as they are."""
    if mode == "none":
        model.to(device) if dtype == torch.float32 else model.to(device, dtype=dtype)
        return 0
    if mode not in MODES:
        raise ConfigError(f"{key}: expected one of {', '.join(MODES)}, got {mode!r}")
    if mode in ("int8", "nf4"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"{key}={mode} needs bitsandbytes: pip install 'xdpo[bnb]'") from None
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    model.requires_grad_(False)
    model.to(dtype=dtype)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is torch.nn.Linear and not any(k in name.split(".") for k in keep)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = Float8Linear(linear) if mode == "fp8" else _bnb_linear(linear, mode, dtype)
        setattr(parent, child, new)
    model.to(device)  # bitsandbytes quantises its weights when they move to a device
    if mode == "int8":
        model.is_loaded_in_8bit = True  # peft wraps the layers in its bitsandbytes LoRA layers
    elif mode == "nf4":
        model.is_loaded_in_4bit = True
    model.xdpo_quantized = mode
    return len(targets)


def linear_weights(model: Any) -> tuple[int, int]:
    """(weights of the model's Linear layers, their output rows): what `model.quantize` stores in fewer bits."""
    n = rows = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            n += mod.in_features * mod.out_features
            rows += mod.out_features
    return n, rows


def quantized_bytes(model: Any, mode: str, dtype_bytes: float) -> float:
    """Bytes of `model`'s weights with its Linear weights in `mode` and everything else in `dtype_bytes`."""
    total = sum(p.numel() for p in model.parameters())
    if mode == "none":
        return total * dtype_bytes
    n, rows = linear_weights(model)
    row_scales = {"int8": 4 * rows, "fp8": dtype_bytes * rows}.get(mode, 0)
    return (total - n) * dtype_bytes + n * BYTES_PER_WEIGHT[mode] + row_scales


def footprint(model: Any) -> int:
    """Bytes the model's parameters and buffers hold now (bitsandbytes' quantisation state included)."""
    seen, n = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    for mod in model.modules():
        state = getattr(getattr(mod, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            n += state.absmax.numel() * state.absmax.element_size()
        scb = getattr(getattr(mod, "state", None), "SCB", None)
        if scb is None:
            scb = getattr(getattr(mod, "weight", None), "SCB", None)
        if scb is not None:
            n += scb.numel() * scb.element_size()
    return n
