"""Webdataset tar shards read in place: an index of member offsets, then random-access reads by offset.

A shard holds samples as consecutive members `KEY.FIELD` (webdataset's `TarWriter` layout: `KEY.caption`,
`KEY.jpg_0`, `KEY.jpg_1`, `KEY.label_0`, ...); FIELD is everything after the first dot of the file name,
and a sample is a run of members with the same KEY. Training needs random access by index (the data
order is a pure function of (seed, step)), so the shards are never unpacked and never streamed:

- Index (once per shard): the tar headers are scanned with `tarfile` (no image is decoded or read
  beyond its first 16 bytes). Every member's (offset, size) is recorded, and members that are short
  text (at most `TEXT_LIMIT` bytes, not starting with an image or video signature: captions, labels, uids) are
  read into the index. The index of a shard is a small parquet file (~100 bytes a sample) under
  `<datasets cache>/xdpo-tar-index/`, named by the shard's absolute path, size and modification
  time: a changed shard is scanned again, an unchanged one never; the shards are only read.
- Table: the shard indexes concatenated, in shard order, into a `datasets.Dataset` with `__url__` (the
  shard's path), `__key__` and one column per field: text fields as strings; other fields (images) as
  `{"offset", "size"}` references, read by `read_member` with one seek and one read.
Compressed shards (`.tar.gz`) cannot be read by offset and are refused with one line.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import tarfile
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdpo.errors import DataError

INDEX_VERSION = 1
TEXT_LIMIT = 64 << 10
"""Members up to this size that do not start with an image signature are read into the index as text."""
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
REF_TYPE = pa.struct([("offset", pa.int64()), ("size", pa.int64())])
MEMBER_TYPE = pa.struct([("offset", pa.int64()), ("size", pa.int64()), ("text", pa.string())])
_SPLIT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: KEY, FIELD


# ----------------------------------------------------------------------------------------------- sources


def _expand_braces(pattern: str) -> list[str]:
    """Webdataset's numeric ranges: `shard-{000..009}.tar` -> shard-000.tar ... shard-009.tar."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for k in range(lo, hi + 1) for x in _expand_braces(f"{head}{k:0{width}d}{tail}")]


def tar_files(path: str) -> list[Path] | None:
    """The shards of a webdataset source in order, or None when `path` is not one.

    A `.tar` file; a comma-separated list of them (with `{000..099}` ranges); a glob matching only
    `.tar` files (sorted); a folder holding `.tar` files and no parquet files (searched recursively, sorted).
    """
    parts = [p.strip() for p in path.split(",") if p.strip()]
    if not parts or not all(p.endswith(".tar") for p in parts):
        local = Path(path).expanduser()
        if glob.has_magic(path):
            found = sorted(Path(f) for f in glob.glob(str(local), recursive=True) if Path(f).is_file())
            return found if found and all(f.suffix == ".tar" for f in found) else None
        if local.is_dir() and not any(local.rglob("*.parquet")):
            found = sorted(f for f in local.rglob("*.tar") if f.is_file())
            return found or None
        return None
    files: list[Path] = []
    for part in parts:
        for name in _expand_braces(part):
            pattern = str(Path(name).expanduser())
            matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(name) else [name]
            for f in matches:
                if not Path(f).expanduser().is_file():
                    raise DataError(f"{f}: no such tar shard (data.path: {path})")
                files.append(Path(f).expanduser())
    return files


# ----------------------------------------------------------------------------------------------- index


def index_folder(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "xdpo-tar-index" / f"v{INDEX_VERSION}"


def index_path(tar: Path, cache_dir: str | None = None) -> Path:
    """The sidecar of `tar`: named by its absolute path, size and modification time."""
    st = tar.stat()
    digest = hashlib.sha256(str(tar.resolve()).encode()).hexdigest()[:20]
    return index_folder(cache_dir) / f"{digest}-{st.st_size}-{st.st_mtime_ns}.parquet"


def scan_tar(tar: Path) -> pa.Table:
    """One row per sample: `__key__` and, per field, {offset, size, text} (text: short non-image members)."""
    with open(tar, "rb") as raw:
        if raw.read(2) == b"\x1f\x8b":
            raise DataError(f"{tar}: a gzip-compressed tar cannot be read by offset; decompress it (gunzip)")
        raw.seek(0)
        try:
            members = _members(tar, raw)
        except tarfile.TarError as e:
            raise DataError(f"{tar}: not a readable tar file ({e})") from None
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for key, field, value in members:
        if not rows or rows[-1]["__key__"] != key:
            if key in seen:
                raise DataError(
                    f"{tar}: sample {key} is split by other samples' members (not webdataset order)"
                )
            seen.add(key)
            rows.append({"__key__": key})
        if field in rows[-1]:
            raise DataError(f"{tar}: sample {key} has two members named {key}.{field}")
        rows[-1][field] = value
    fields = sorted({f for r in rows for f in r} - {"__key__"})
    data = {"__key__": pa.array([r["__key__"] for r in rows], pa.string())}
    for f in fields:
        data[f] = pa.array([r.get(f) for r in rows], MEMBER_TYPE)
    return pa.table(data)


def _members(tar: Path, raw: BinaryIO) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, field, {offset, size, text}) of every regular member, in tar order."""
    out = []
    with tarfile.open(fileobj=raw, mode="r:") as tf, open(tar, "rb") as data:
        for info in tf:
            if not info.isfile():
                continue
            m = _SPLIT.match(info.name)
            if m is None or Path(info.name).name.startswith("."):
                continue
            data.seek(info.offset_data)
            head = data.read(info.size if info.size <= TEXT_LIMIT else 16)
            text = None
            binary = head.startswith(IMAGE_SIGNATURES) or _is_webp(head) or _is_video(head)
            if info.size <= TEXT_LIMIT and not binary:
                text = head.decode("utf-8", errors="replace")
            out.append(
                (m.group(1), m.group(2), {"offset": info.offset_data, "size": info.size, "text": text})
            )
    return out


def _is_webp(head: bytes) -> bool:
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def _is_video(head: bytes) -> bool:
    """An ISO media file (mp4, mov: an `ftyp` box first) or a Matroska / WebM file (EBML header)."""
    return head[4:8] == b"ftyp" or head.startswith(b"\x1a\x45\xdf\xa3")


def shard_index(tar: Path, cache_dir: str | None = None) -> pa.Table:
    """`scan_tar(tar)`, from its sidecar when one exists (written once, atomically, on first use)."""
    side = index_path(tar, cache_dir)
    if side.is_file():
        try:
            return pq.read_table(side)
        except Exception:  # noqa: BLE001 - a damaged sidecar is scanned again
            pass
    table = scan_tar(tar)
    side.parent.mkdir(parents=True, exist_ok=True)
    tmp = side.with_name(f"{side.name}.tmp{uuid.uuid4().hex[:12]}")
    pq.write_table(table, tmp)
    os.replace(tmp, side)
    return table


def load_tar_table(
    files: Sequence[Path], source: str, cache_dir: str | None = None, *, progress: bool = True
) -> datasets.Dataset:
    """The samples of `files` as a table (module docstring); scans only shards without a current sidecar."""
    from tqdm.auto import tqdm

    if not files:
        raise DataError(f"{source}: no .tar shards found")
    todo = sum(not index_path(f, cache_dir).is_file() for f in files)
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        tables = list(
            tqdm(
                pool.map(lambda f: shard_index(f, cache_dir), files),
                total=len(files),
                desc=f"indexing {todo} tar shard(s)",
                unit="shard",
                disable=not progress or todo == 0,
            )
        )
    parts = [
        t.append_column("__url__", pa.array([str(f.resolve())] * t.num_rows, pa.string()))
        for f, t in zip(files, tables, strict=True)
    ]
    table = pa.concat_tables(parts, promote_options="default")
    columns: dict[str, pa.ChunkedArray] = {
        "__url__": table["__url__"],
        "__key__": table["__key__"],
    }
    for name in table.column_names:
        if name in columns:
            continue
        col = table[name]
        text, offset = pc.struct_field(col, "text"), pc.struct_field(col, "offset")
        has_member = pc.is_valid(offset)
        all_text = pc.all(pc.or_(pc.invert(has_member), pc.is_valid(text))).as_py()
        if all_text is not False:  # every present member is text (or the field is always absent)
            columns[name] = text
        else:
            columns[name] = pa.StructArray.from_arrays(
                [offset.combine_chunks(), pc.struct_field(col, "size").combine_chunks()],
                names=["offset", "size"],
                mask=pc.invert(has_member).combine_chunks(),
            )
    return datasets.Dataset(datasets.table.InMemoryTable(pa.table(columns)))


# ----------------------------------------------------------------------------------------------- reading


def is_member_ref(value: Any) -> bool:
    return isinstance(value, dict) and "offset" in value and "size" in value and "bytes" not in value


class MemberReader:
    """Reads `{"offset", "size"}` members of tar shards with `os.pread` (no shared file position, so
    DataLoader workers forked after a read stay correct); keeps up to `max_open` shards open per process."""

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max_open
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:  # open files stay in their process
        return {"max_open": self.max_open, "_fds": {}, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_pid", -1) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def read(self, tar: str, ref: dict[str, Any]) -> bytes:
        if self._pid != os.getpid():  # a forked or unpickled copy: open its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(tar)
        if fd is None:
            if len(self._fds) >= self.max_open:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[tar] = os.open(tar, os.O_RDONLY)
        size, offset = int(ref["size"]), int(ref["offset"])
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError(f"truncated member: {len(data)} of {size} bytes at offset {offset}")
        return data
