"""Where an image value's data are: inline bytes, a `{bytes, path}` dict, a file path, or a tar member.

Image columns may hold raw bytes; the `datasets` Image feature's `{"bytes", "path"}` dicts (bytes are
used when set, else the path); file paths (strings); or, for webdataset shards, `{"offset", "size"}`
references into the row's `__url__` shard (`tarshards.py`). A relative path is looked up in the folder
of the parquet file holding the row, then in the data root (`data.path` when it is a folder, the
folder of a file, the fixed part of a glob), then as given (relative to the working directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xdpo.data.schema import image_roots
from xdpo.data.tarshards import MemberReader, is_member_ref
from xdpo.data.transforms import decode_image


class ImageFetcher:
    """`fetch(value, record, row)` -> bytes, an absolute path or the value itself, for `decode_image`."""

    def __init__(self, source: str = "", split: str = "train") -> None:
        self.source, self.split = source, split
        self.members = MemberReader()

    def __call__(self, value: Any, record: dict[str, Any], row: int) -> Any:
        if is_member_ref(value):
            url = record.get("__url__")
            if not url:
                raise ValueError("missing image: a tar member reference without its shard (__url__)")
            return self.members.read(url, value)
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
            return self.path(value["path"], row)
        if isinstance(value, str | Path):
            if not str(value):
                raise ValueError("missing image (empty path)")
            return self.path(value, row)
        return value

    def path(self, name: str | Path, row: int) -> Path:
        """The file of an image path: absolute as is, relative looked up as the module docstring says."""
        p = Path(name).expanduser()
        if p.is_absolute():
            if not p.is_file():
                raise ValueError(f"missing image file {p}")
            return p
        roots = image_roots(self.source, self.split, row)
        for root in roots:
            if (root / p).is_file():
                return root / p
        if p.is_file():
            return p.resolve()
        where = ", ".join(str(r) for r in roots) or str(Path.cwd())
        raise ValueError(f"missing image file {str(name)!r} (looked in {where})")

    def decode(self, value: Any, record: dict[str, Any], row: int, min_side: int = 0) -> Any:
        """`decode_image` of the fetched value (raises what fetching or decoding raises)."""
        return decode_image(self(value, record, row), min_side=min_side)
