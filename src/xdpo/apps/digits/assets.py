"""The shipped digits pipelines, each file stored once.

digits-flow reuses digits-base's CLIP tokenizer (as its `tokenizer` and `tokenizer_2`) and its VAE
weights. The package stores those files once, in digits-base; the shipped digits-flow folder lists
them in `xdpo_shared.json` (path in the pipeline -> the stored file and its sha256) instead of
holding copies. `pipeline_folder(shipped)` returns a complete diffusers folder for `from_pretrained`:
a folder without that list as it is; otherwise the folder assembled once under the user cache
(`$XDG_CACHE_HOME/xdpo/pipelines/<content hash>/<name>`, default `~/.cache/xdpo`) from hard links to
the shipped files (copies across file systems), built in a temporary folder and renamed into place,
so that concurrent processes never see a partial folder. The hash covers every file's content, so a
rebuilt asset gets a new folder, and a stored file that no longer matches its sha256 is one clear
error. `ship(folder, name)` stores a built pipeline folder this way (scripts/build_digits_flow.sh).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from xdpo.errors import XdpoError

ASSETS = Path(__file__).resolve().parent / "assets"
SHARED = "xdpo_shared.json"
STORE = "digits-base"  # the folder that holds the shared files


def cache_root() -> Path:
    """Where assembled pipelines live: `$XDG_CACHE_HOME/xdpo` (default `~/.cache/xdpo`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xdpo"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shared_files(shipped: Path) -> dict[str, dict[str, str]]:
    """`xdpo_shared.json`'s files: path in the pipeline -> {"from": path under the assets, "sha256"}."""
    record = shipped / SHARED
    return json.loads(record.read_text())["files"] if record.is_file() else {}


def layout(shipped: Path) -> dict[str, Path]:
    """Every file of the complete pipeline (relative path -> the stored file it is)."""
    own = {
        f.relative_to(shipped).as_posix(): f
        for f in sorted(shipped.rglob("*"))
        if f.is_file() and f.name != SHARED
    }
    shared = {rel: shipped.parent / entry["from"] for rel, entry in shared_files(shipped).items()}
    return own | shared


_keys: dict[tuple, str] = {}


def content_key(shipped: Path) -> str:
    """sha256 over the complete pipeline's (path, file sha256) pairs, checking each shared file against its
    recorded sha256; computed once per process and state of the files (sizes, modification times)."""
    files = layout(shipped)
    missing = sorted(str(src) for src in files.values() if not src.is_file())
    if missing:
        raise XdpoError(f"{shipped}: the stored file(s) {', '.join(missing)} are missing: reinstall xdpo")
    state = tuple((rel, str(src), src.stat().st_size, src.stat().st_mtime_ns) for rel, src in files.items())
    if state not in _keys:
        digests = {rel: sha256_file(src) for rel, src in files.items()}
        for rel, entry in shared_files(shipped).items():
            if digests[rel] != entry["sha256"]:
                raise XdpoError(
                    f"{shipped}/{SHARED}: {rel} is {entry['from']} with sha256 {entry['sha256'][:12]}..., but "
                    f"that file now has {digests[rel][:12]}... ({STORE} rebuilt?): rebuild {shipped.name} "
                    "(scripts/build_digits_flow.sh) or restore the file"
                )
        lines = "".join(f"{rel}\t{digests[rel]}\n" for rel in sorted(digests))
        _keys[state] = hashlib.sha256(lines.encode()).hexdigest()
    return _keys[state]


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def pipeline_folder(shipped: Path) -> Path:
    """The complete pipeline folder of `shipped` (see the module docstring)."""
    if not (shipped / SHARED).is_file():
        return shipped
    files = layout(shipped)
    root = cache_root() / "pipelines"
    final = root / content_key(shipped)[:16]
    target = final / shipped.name
    if all((target / rel).is_file() for rel in files):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".assembling-", dir=root))
    except OSError as e:
        raise XdpoError(
            f"cannot assemble {shipped.name} in {root} ({e.strerror}): set XDG_CACHE_HOME to a writable folder"
        ) from None
    try:
        for rel, src in files.items():
            _link_or_copy(src, tmp / shipped.name / rel)
        if final.exists():  # incomplete (files removed since): replaced
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its complete folder into place first
            if not all((target / rel).is_file() for rel in files):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ship(folder: str | Path, name: str, assets: Path = ASSETS) -> Path:
    """Store the built pipeline `folder` as the shipped `name` in `assets`: files identical to one in
    `assets`/digits-base are listed in `xdpo_shared.json`, not copied. Returns the shipped folder."""
    folder, store, out = Path(folder), assets / STORE, assets / name
    if out == store:
        raise XdpoError(
            f"{name}: the store itself ships whole (write it with `xdpo digits build-base --out`)"
        )
    stored = {
        sha256_file(f): f.relative_to(assets).as_posix() for f in sorted(store.rglob("*")) if f.is_file()
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=assets))
    shared: dict[str, dict[str, str]] = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.name == SHARED:
            continue
        rel, digest = f.relative_to(folder).as_posix(), sha256_file(f)
        if digest in stored:
            shared[rel] = {"from": stored[digest], "sha256": digest}
        else:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, tmp / rel)
    note = f"files stored once, in {STORE}; xdpo.apps.digits.assets assembles the complete folder"
    (tmp / SHARED).write_text(json.dumps({"about": note, "files": shared}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out
