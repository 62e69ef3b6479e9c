"""Real tokenizers without a hub download: CLIP's BPE tokenizer and a small T5 tokenizer.

CLIP: the `open_clip_torch` wheel ships OpenAI's BPE merges (`bpe_simple_vocab_16e6.txt.gz`). We convert
them to the `vocab.json`/`merges.txt` pair that `transformers.CLIPTokenizer` reads, exactly as
OpenAI's `SimpleTokenizer` builds its vocabulary (256 byte symbols, the same with `</w>`, 48,894
merges, then `<|startoftext|>` and `<|endoftext|>`: 49,408 tokens, as in SD 1.x/2.x).
The package is located with `importlib` and never imported (it would import torchvision).

T5 (for the small SD3 and Flux pipelines of `xdpo.models.small`): a `T5TokenizerFast` around a small
`tokenizers` Unigram model: T5's special tokens (`<pad>` 0, `</s>` 1, `<unk>` 2), the test captions'
words, the first 300 whole words (3+ letters) of the CLIP BPE merges and single characters.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import string
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from xdpo.errors import XdpoError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2
T5_WORDS = 300
CAPTION_WORDS = (
    "a an the of and with by in on picture photo image painting drawing scan digit number handwritten "
    "written hand bright dark zero one two three four five six seven eight nine cat dog squirrel eating burger"
)
"""Words of the tests' and the digits world's captions, whole pieces in the small T5 vocabulary."""


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


def clip_tokenizer(tokenizer_dir: str | Path | None = None) -> Any:
    """The real CLIP tokenizer: loaded from `tokenizer_dir`, or built from the open_clip BPE file."""
    from transformers import CLIPTokenizer

    if tokenizer_dir is not None:
        return CLIPTokenizer.from_pretrained(tokenizer_dir)
    with tempfile.TemporaryDirectory(prefix="xdpo-tok-") as tmp:
        return build_clip_tokenizer(tmp)


# ---- T5 ----------------------------------------------------------------------------------------------------


def _frequent_words(n: int) -> list[str]:
    """The first `n` whole alphabetic words merged in the CLIP BPE file (roughly by frequency)."""
    with gzip.open(open_clip_bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")[1 : N_MERGES + 1]
    words: list[str] = []
    for line in lines:
        word = "".join(line.split())
        if word.endswith("</w>") and word[:-4].isascii() and word[:-4].isalpha() and len(word) > 6:
            words.append(word[:-4])
            if len(words) == n:
                break
    return words


def t5_vocabulary(n_words: int = T5_WORDS) -> list[tuple[str, float]]:
    """Unigram (piece, log-probability) pairs: T5's specials, "▁", whole words, single characters."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    words = list(dict.fromkeys([*CAPTION_WORDS.split(), *_frequent_words(n_words)]))
    vocab += [("\u2581" + w, -6.0 - i / 100) for i, w in enumerate(words)]
    chars = string.ascii_letters + string.digits + string.punctuation
    seen = {piece for piece, _ in vocab}
    vocab += [(c, -12.0) for c in chars]
    vocab += [("\u2581" + c, -11.0) for c in chars if "\u2581" + c not in seen]
    return vocab


def build_t5_tokenizer(out_dir: str | Path | None = None, *, max_length: int = 512) -> Any:
    """A `T5TokenizerFast` around a small Unigram model (T5's pre-tokenizer and `</s>` suffix); saved
    in `out_dir` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram(t5_vocabulary(), unk_id=2, byte_fallback=False))
    metaspace = {"replacement": "\u2581", "prepend_scheme": "always", "split": True}
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    tok.decoder = decoders.Metaspace(**metaspace)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    t5 = T5TokenizerFast(
        tokenizer_object=tok,
        extra_ids=0,
        model_max_length=max_length,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    if out_dir is not None:
        t5.save_pretrained(out_dir)
    return t5


def t5_tokenizer(t5_tokenizer_dir: str | Path | None = None) -> Any:
    """The small T5 tokenizer: loaded from `t5_tokenizer_dir`, or built (`build_t5_tokenizer`)."""
    if t5_tokenizer_dir is None:
        return build_t5_tokenizer()
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(t5_tokenizer_dir)
