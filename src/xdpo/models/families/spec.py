"""The `Family` record: how a diffusers pipeline of one family is trained (see `families/__init__.py`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str
    class_names: tuple[str, ...]
    denoiser: str
    process: str
    load_kwargs: Callable[[Any], dict[str, Any]]
    encode_text: Callable[..., dict[str, Any]]
    image_conditions: Callable[..., dict[str, Any]]
    predict: Callable[..., Any]
    about: str = ""

    def pipeline_cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class)
