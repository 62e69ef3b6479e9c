"""Loading reward-model weights: hub ids or local paths, optional packages, one-line errors.

Used by the scorers in rewards.py and hps.py. A reference is a local path when it exists, else a
hub id (`from_pretrained`) or a hub (repo, filename) (`weights_file`); failures name the
`--weights NAME=PATH` option that supplies a local copy. State dicts load with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from xdpo.errors import XdpoError


class MissingExtraError(XdpoError, ImportError):
    """An optional package a scorer needs is not installed (or does not import)."""


class WeightsError(XdpoError, OSError):
    """Weights cannot be found, downloaded or read."""


def first_line(e: BaseException, limit: int = 200) -> str:
    lines = [s for s in str(e).strip().splitlines() if s.strip()]
    text = lines[0].strip() if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require(module: str, extra: str, what: str, hint: str = "") -> ModuleType:
    """Import an optional package, or fail with one line naming `pip install "xdpo[extra]"`."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or e.g. a torchvision that does not match torch
        raise MissingExtraError(
            f"{what} needs the `{module}` package, which does not import here "
            f'({type(e).__name__}: {first_line(e)}): pip install "xdpo[{extra}]"{hint}'
        ) from None


def resolve_device(device: str | None) -> str:
    from xdpo.evaluate.pipeline import resolve_device as resolve

    return resolve(device)


def local_or_hub(ref: str, key: str) -> tuple[str, bool]:
    """(ref, is_local): an existing path, else a hub id; a missing path-like ref is an error."""
    path = Path(ref).expanduser()
    if path.exists():
        return str(path), True
    if ref.startswith(("/", ".", "~")) or ref.count("/") > 1 or "\\" in ref:
        raise WeightsError(f"--weights {key}: {ref} not found")
    return ref, False


def from_pretrained(cls: Any, ref: str, *, key: str, what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(ref)` (local folder or hub id) with a one-line error naming `--weights key`."""
    ref, local = local_or_hub(ref, key)
    try:
        return cls.from_pretrained(ref, **kwargs)
    except Exception as e:  # OSError offline / not found, ValueError on a malformed folder
        hint = "" if local else "offline or not downloaded yet? "
        raise WeightsError(
            f"{what}: cannot load {ref!r} ({first_line(e)}); {hint}pass a local copy with --weights {key}=PATH"
        ) from None


def weights_file(ref: str | None, default: tuple[str, str], *, key: str, what: str) -> str:
    """A local weights file, or `default` = (hub repo, filename) fetched with `hf_hub_download`."""
    if ref is not None:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise WeightsError(f"--weights {key}: {ref} is not a file")
        return str(path)
    from huggingface_hub import hf_hub_download

    repo, filename = default
    try:
        return hf_hub_download(repo, filename)
    except Exception as e:
        raise WeightsError(
            f"{what}: cannot download {filename} from the hub repo {repo} ({first_line(e)}); "
            f"pass a local file with --weights {key}=PATH"
        ) from None


def load_weights(path: str | Path, *, what: str) -> dict[str, Any]:
    """A state dict from .safetensors, or `torch.load(map_location="cpu", weights_only=True)`."""
    import torch

    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code objects is refused by weights_only=True
        raise WeightsError(
            f"{path}: cannot read {what} weights with weights_only=True ({first_line(e)})"
        ) from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def fingerprint(path: str | Path, max_bytes: int = 64 << 20) -> str:
    """sha256 (12 hex) of a file up to `max_bytes`, else its size: cheap cache-invalidation key."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        return f"{size} bytes"
    return "sha256 " + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
