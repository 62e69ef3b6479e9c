"""The shipped digits pipelines store each file once; digits-flow is assembled into the cache, complete."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import pytest

from xdpo.apps.digits import assets, base_model_path, flow_base_model_path, shipped_flow_base
from xdpo.errors import XdpoError


def tree(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def write(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A tiny assets folder: a digits-base store, a built pipeline sharing two of its files, a cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "assets"
    write(root / "digits-base", {"tokenizer/vocab.json": b"vocab", "vae/w.bin": b"weights", "x.json": b"{1}"})
    built = {
        "model_index.json": b"{}",
        "tokenizer/vocab.json": b"vocab",
        "tokenizer_2/vocab.json": b"vocab",
        "vae/w.bin": b"weights",
        "vae/config.json": b"own",
    }
    write(tmp_path / "built", built)
    return root, tmp_path / "built", built


def test_ship_then_assemble_gives_the_built_folder_back(store):
    root, built, files = store
    shipped = assets.ship(built, "twin", assets=root)
    assert set(tree(shipped)) == {"model_index.json", "vae/config.json", assets.SHARED}
    shared = assets.shared_files(shipped)
    assert {rel: e["from"] for rel, e in shared.items()} == {
        "tokenizer/vocab.json": "digits-base/tokenizer/vocab.json",
        "tokenizer_2/vocab.json": "digits-base/tokenizer/vocab.json",
        "vae/w.bin": "digits-base/vae/w.bin",
    }
    folder = assets.pipeline_folder(shipped)
    assert folder.name == "twin" and folder.parent.parent == assets.cache_root() / "pipelines"
    assert tree(folder) == files
    assert assets.pipeline_folder(shipped) == folder  # found, not rebuilt
    assert not [p for p in folder.parent.parent.iterdir() if p.name.startswith(".assembling")]
    (folder / "tokenizer_2" / "vocab.json").unlink()  # a damaged cache folder is assembled again
    assert tree(assets.pipeline_folder(shipped)) == files


def test_a_changed_file_gets_a_new_folder_and_a_changed_shared_file_is_an_error(store):
    root, built, _ = store
    shipped = assets.ship(built, "twin", assets=root)
    first = assets.pipeline_folder(shipped)
    (shipped / "vae" / "config.json").write_text("retrained")
    second = assets.pipeline_folder(shipped)
    assert second != first and (second / "vae" / "config.json").read_text() == "retrained"
    (root / "digits-base" / "vae" / "w.bin").write_bytes(b"other weights")
    with pytest.raises(XdpoError, match=r"vae/w.bin is digits-base/vae/w.bin with sha256 .*rebuild twin"):
        assets.pipeline_folder(shipped)


def test_a_folder_without_shared_files_is_used_as_it_is(store):
    _, built, _ = store
    assert assets.pipeline_folder(built) == built


def test_the_shipped_assets_store_each_large_file_once():
    by_content = defaultdict(list)
    for f in sorted(assets.ASSETS.rglob("*")):
        if f.is_file() and f.stat().st_size > 10_000:  # a few small configs repeat (text_encoder, _2)
            by_content[hashlib.sha256(f.read_bytes()).hexdigest()].append(f.relative_to(assets.ASSETS))
    assert [files for files in by_content.values() if len(files) > 1] == []
    shared = json.loads((shipped_flow_base() / assets.SHARED).read_text())["files"]
    assert set(shared) == {
        *(f"{tok}/{name}" for tok in ("tokenizer", "tokenizer_2") for name in ("merges.txt", "vocab.json")),
        *(f"{tok}/tokenizer_config.json" for tok in ("tokenizer", "tokenizer_2")),
        "vae/diffusion_pytorch_model.safetensors",
    }


def test_digits_flow_resolves_to_a_complete_folder():
    from xdpo.models.load import resolve_pretrained

    path = flow_base_model_path()
    assert resolve_pretrained("digits-flow") == str(path) and path.name == "digits-flow"
    index = json.loads((path / "model_index.json").read_text())
    components = [k for k, v in index.items() if not k.startswith("_") and v[0] is not None]
    assert all((path / c).is_dir() for c in components), components
    base = base_model_path()
    for tok in ("tokenizer", "tokenizer_2"):
        assert tree(path / tok) == tree(base / "tokenizer")
    weights = "vae/diffusion_pytorch_model.safetensors"
    assert (path / weights).read_bytes() == (base / weights).read_bytes()
