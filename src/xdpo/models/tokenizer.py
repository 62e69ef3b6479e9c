"""A real CLIP BPE tokenizer without a hub download.

The `open_clip_torch` wheel ships OpenAI's BPE merges (`bpe_simple_vocab_16e6.txt.gz`). We convert
them to the `vocab.json`/`merges.txt` pair that `transformers.CLIPTokenizer` reads, exactly as
OpenAI's `SimpleTokenizer` builds its vocabulary (256 byte symbols, the same with `</w>`, 48,894
merges, then `<|startoftext|>` and `<|endoftext|>`: 49,408 tokens, as in SD 1.x/2.x).
The package is located with `importlib` and never imported (it would import torchvision).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from xdpo.errors import XdpoError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2


def open_clip_bpe_path() -> Path:
    """Path of the BPE file inside the installed `open_clip` package (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise XdpoError(
            "the CLIP BPE vocabulary comes from the open_clip_torch wheel: "
            "run `pip install --no-deps open_clip_torch` (it is read, not imported)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise XdpoError(f"{path} is missing from the installed open_clip_torch package")
    return path


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_vocab(out_dir: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write `vocab.json` and `merges.txt` for a CLIP tokenizer into `out_dir`; return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(bpe_path or open_clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


def build_clip_tokenizer(out_dir: str | Path, bpe_path: str | Path | None = None):
    """A `transformers.CLIPTokenizer` as in SD 1.x (max length 77, pad = `<|endoftext|>`), saved in `out_dir`."""
    from transformers import CLIPTokenizer

    out = write_clip_vocab(out_dir, bpe_path)
    # from_pretrained reads vocab.json + merges.txt in both transformers 4.x and 5.x.
    tok = CLIPTokenizer.from_pretrained(out, model_max_length=77, pad_token="<|endoftext|>")
    tok.save_pretrained(out)
    return tok
