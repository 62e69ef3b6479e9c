"""Reading a latent cache during training (`data.cache`): the shards memory-mapped, a batch's rows gathered
per shard and tensor, the items a cached run trains on (the format: `xdpo.data.cache`)."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xdpo.data.batch import Batch
from xdpo.data.cache import (
    FLIP,
    IMAGE_SIZE_KEYS,
    LATENT_KEYS,
    MANIFEST,
    check_manifest,
    depends,
    open_pairs,
    pair_shard,
    read_manifest,
    shard_layout,
    shard_metadata,
    text_shard,
)
from xdpo.data.transforms import draw_flips
from xdpo.errors import ConfigError, DataError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def map_shard(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (an 8-byte header length, a JSON header, the data) as views of
    one private memory map of it. Indexing such a view copies just the rows it reads: a batch's rows of a
    tensor in one indexing (~5 us), where `safe_open` takes a slice per row (~20 us each). The views are
    never handed out (callers index, i.e. copy, them) nor written."""
    if sys.byteorder != "little":  # the data is little-endian: safetensors converts it (whole tensors)
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        data = torch.UntypedStorage.from_file(str(path), False, size)  # mmap, MAP_PRIVATE; no fd kept
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = (8 + n + o for o in info["data_offsets"])
            if not 8 + n <= begin <= end <= size:
                raise ValueError(f"tensor {name} lies outside the file")
            raw = torch.empty(0, dtype=torch.uint8).set_(data[begin:end])
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            t = raw.view(dtype).view(info["shape"])
            out[name] = t if t.data_ptr() % dtype.itemsize == 0 else t.clone()  # (writers align data)
        return out
    except Exception as e:  # noqa: BLE001 - missing, truncated or foreign: all mean "not a shard"
        raise DataError(f"data.cache: cannot read shard {path} ({e}); run `xdpo cache` again") from None


def item_choices(seed: int, prompt_dropout: float, flip: str) -> tuple[bool, bool, bool]:
    """(drop the caption, flip w, flip l) of item seed `seed`: the draws of `PreferencePairs._item` and
    `transform_pair`, in their order (no crop draws: random crops are never cached)."""
    if prompt_dropout <= 0 and flip == "none":
        return False, False, False  # nothing drawn (creating the generator alone costs ~10 us)
    rng = np.random.default_rng(seed)
    drop = prompt_dropout > 0 and rng.random() < prompt_dropout
    return (bool(drop), *draw_flips(rng, flip))


class CachedPairs(torch.utils.data.Dataset):
    """Cached pairs indexed by `(index, seed)` like `PreferencePairs`: posterior parameters of w and l
    (the item's flips), the caption's conditions (or the empty caption's, by the item's dropout draw)."""

    @staticmethod
    def collate(items: list[dict]) -> Batch:
        """Items -> one `Batch` (`collate_cached`), for a DataLoader's `collate_fn`."""
        return collate_cached(items)

    def __init__(
        self, folder: str | Path, manifest: dict[str, Any], *, prompt_dropout: float, flip: str,
        bucket_of: np.ndarray | None = None,
    ) -> None:  # fmt: skip
        self.folder, self.manifest = Path(folder), manifest
        self.prompt_dropout, self.flip = float(prompt_dropout), flip
        self.n_pairs, self.shard = int(manifest["n_pairs"]), int(manifest["shard_size"])
        self.n_ties, self.n_dropped = manifest.get("n_ties", 0), manifest.get("n_dropped", 0)
        self.resolution = int(manifest["depends"]["data.resolution"])
        self.captions: list[str] = []
        for k in range(manifest["text_shards"]):
            self.captions += json.loads(shard_metadata(text_shard(self.folder, k))["captions"])
        lookup = {c: i for i, c in enumerate(self.captions)}
        # where each pair is stored (`shard_layout`), its caption and its size (data.buckets: its bucket's)
        layout = shard_layout(self.n_pairs, self.shard, bucket_of)
        if len(layout) != manifest["pair_shards"]:
            raise DataError(f"data.cache: {folder} has {manifest['pair_shards']} pair shards, the data gives {len(layout)}")  # fmt: skip
        self.shard_of = np.zeros(self.n_pairs, dtype=np.int64)
        self.offset_of = np.zeros(self.n_pairs, dtype=np.int64)
        self.caption_index = np.full(self.n_pairs, -1, dtype=np.int64)
        for k, members in enumerate(layout):
            names = json.loads(shard_metadata(pair_shard(self.folder, k))["captions"])
            if len(names) != len(members):
                raise DataError(f"data.cache: {folder} shard {k} has {len(names)} pairs, not {len(members)}")
            self.shard_of[members], self.offset_of[members] = k, np.arange(len(members))
            self.caption_index[members] = [lookup[c] for c in names]
        self.buckets = [tuple(b) for b in manifest["buckets"]] if bucket_of is not None else None
        self.bucket_of = bucket_of
        square = (self.resolution, self.resolution)
        self.sizes = [square] if bucket_of is None else [(h, w) for w, h in self.buckets]  # (height, width)
        self.empty = lookup.get("")
        self._files: dict[Path, dict[str, torch.Tensor]] = {}
        self._paths: dict[tuple[bool, int], Path] = {}
        self._small: dict[tuple[Path, str], list[float | int]] = {}
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}

    def __len__(self) -> int:
        return self.n_pairs

    def __getstate__(self) -> dict[str, Any]:  # open files stay in their process (DataLoader workers)
        return {**self.__dict__, "_files": {}, "_small": {}}

    def _open(self, path: Path) -> dict[str, torch.Tensor]:
        """A shard's tensors, memory-mapped once per process (`map_shard`: an index reads only its rows)."""
        tensors = self._files.get(path)
        if tensors is None:
            tensors = self._files[path] = map_shard(path)
        return tensors

    def _rows(self, requests: list[tuple[Path, str, int]]) -> list[torch.Tensor]:
        """Row `offset` of tensor `name` of shard `path` for each request, one indexing per (shard, tensor)."""
        groups: dict[tuple[Path, str], tuple[list[int], list[int]]] = {}
        for j, (path, name, offset) in enumerate(requests):
            at, offsets = groups.setdefault((path, name), ([], []))
            at.append(j)
            offsets.append(offset)
        if len(groups) == 1:  # one shard and tensor for the whole batch (no flips, one shard)
            [(path, name)] = groups
            offsets = groups[path, name][1]
            return list(self._open(path)[name][self._index(offsets)].unbind(0))
        out: list[Any] = [None] * len(requests)
        for (path, name), (at, offsets) in groups.items():
            for j, row in zip(at, self._open(path)[name][self._index(offsets)].unbind(0), strict=True):
                out[j] = row
        return out

    def _values(self, path: Path, name: str) -> list[float | int]:
        """A small per-pair tensor of a shard (labels, rows) as a list, read whole once."""
        values = self._small.get((path, name))
        if values is None:
            values = self._small[path, name] = self._open(path)[name].tolist()
        return values

    def _index(self, offsets: list[int]) -> torch.Tensor:
        key = tuple(offsets)
        if key not in self._indices:
            self._indices = {key: torch.tensor(offsets)}  # shared by the batch's tensors of one shard
        return self._indices[key]

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int] | int]) -> list[dict[str, Any]]:
        """The items of `keys`, each as `__getitem__` gives it. The DataLoader reads a whole batch through
        here: one indexing per (shard, tensor) for all the batch's rows, not one read per row and tensor."""
        picks = []  # per item: its pair shard, its row there, the suffixes of w and l, its caption
        for key in keys:
            index, seed = (key, key) if isinstance(key, int | np.integer) else key
            if not 0 <= index < self.n_pairs:
                raise IndexError(f"index {index} out of range for {self.n_pairs} cached pairs")
            drop, flip_w, flip_l = item_choices(seed, self.prompt_dropout, self.flip)
            shard, off = int(self.shard_of[index]), int(self.offset_of[index])
            caption = self.empty if drop else int(self.caption_index[index])
            sw, sl = FLIP if flip_w else "", FLIP if flip_l else ""
            picks.append((self._shard_path(shard, text=False), off, sw, sl, caption, index))
        items: list[dict[str, Any]] = [{} for _ in picks]
        if not picks:
            return items

        def fill(field: str, requests: list[tuple[Path, str, int]]) -> None:
            for item, row in zip(items, self._rows(requests), strict=True):
                item[field] = row

        for name in LATENT_KEYS:  # w's tensors in w's orientation, l's in l's
            fill(
                name,
                [(path, name + (sw if name.endswith("_w") else sl), off) for path, off, sw, sl, *_ in picks],
            )
        for item, (path, off, *_, index) in zip(items, picks, strict=True):
            item["label_w"] = float(self._values(path, "label_w")[off])
            item["row"] = int(self._values(path, "row")[off])
            item["pixel_size"] = self.sizes[0 if self.bucket_of is None else int(self.bucket_of[index])]
        names = self._open(picks[0][0])
        for name in IMAGE_SIZE_KEYS:  # SDXL's sizes, of the orientation served (crop offsets mirror)
            if name + FLIP in names:
                ws = self._rows([(path, name + sw, off) for path, off, sw, _, _, _ in picks])
                ls = self._rows([(path, name + sl, off) for path, off, _, sl, _, _ in picks])
                for item, w_size, l_size in zip(items, ws, ls, strict=True):
                    item[name] = torch.stack([w_size[0], l_size[1]])
            elif name in names:  # one tensor for both orientations
                fill(name, [(path, name, off) for path, off, *_ in picks])
        texts = [(self._shard_path(c // self.shard, text=True), c % self.shard) for *_, c, _ in picks]
        conds: list[dict[str, torch.Tensor]] = [{} for _ in picks]
        for k in sorted(self._open(texts[0][0])):
            for cond, row in zip(conds, self._rows([(path, k, off) for path, off in texts]), strict=True):
                cond[k] = row
        for item, cond, (*_, c, _) in zip(items, conds, picks, strict=True):
            item["cond"], item["caption"] = cond, self.captions[c]
        return items

    def _shard_path(self, k: int, *, text: bool) -> Path:
        key = (text, k)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = (text_shard if text else pair_shard)(self.folder, k)
        return path


def collate_cached(items: list[dict[str, Any]]) -> Batch:
    """A cached `Batch` of pairs: posterior `(mean, logvar)` [2B, C, h, w] for [w; l], conditions
    {key: [B, ...]}, labels, rows; SDXL's sizes [2B, 2] when cached."""
    mean = torch.stack([it["mean_w"] for it in items] + [it["mean_l"] for it in items])
    logvar = torch.stack([it["logvar_w"] for it in items] + [it["logvar_l"] for it in items])
    sizes = {
        name: torch.stack([it[name] for it in items], dim=1).view(-1, 2)  # [w...; l...]
        for name in IMAGE_SIZE_KEYS
        if name in items[0]
    }
    return Batch(
        captions=[it["caption"] for it in items],
        label=torch.tensor([it["label_w"] for it in items], dtype=torch.float32),
        pairs=True,
        pixel_size=items[0]["pixel_size"],
        posterior=(mean, logvar),
        cond={k: torch.stack([it["cond"][k] for it in items]) for k in items[0]["cond"]},
        sizes=sizes,
        rows=torch.tensor([it["row"] for it in items], dtype=torch.long),
    )


def open_cache(cfg: Any, fam: Any) -> CachedPairs:
    """The cache of `data.cache`, checked against the config and the data (one line on a mismatch).

    The data's labels and captions are read again (no image is decoded) to check the row and pair counts."""
    folder = Path(cfg.data.cache)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ConfigError(
            f"data.cache: {folder} holds no cache (no {MANIFEST}); build it with `xdpo cache` and this config"
        )
    if not manifest.get("complete"):
        raise ConfigError(
            f"data.cache: {folder} is incomplete (a cache run was interrupted); run `xdpo cache` with this "
            "config again to finish it"
        )
    table, pairs, n_pairs = open_pairs(cfg, plain=True)
    check_manifest(manifest, cfg, depends(cfg, fam, table, pairs, n_pairs))
    cached = CachedPairs(
        folder, manifest, prompt_dropout=cfg.data.prompt_dropout, flip=cfg.data.flip,
        bucket_of=getattr(pairs, "bucket_of", None),
    )  # fmt: skip
    cached.n_ties, cached.n_dropped = pairs.n_ties, pairs.n_dropped
    return cached
