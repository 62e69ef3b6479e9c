"""docs/config.md's table of configuration keys, kept equal to the schema: the page holds `markdown_table()`
between two marker comments; `python -m xdpo.config.key_page docs/config.md` rewrites it there after a key
changes (tests/test_config.py fails until it has been)."""

from __future__ import annotations

import sys
from pathlib import Path

from xdpo.config.dump import markdown_table

KEY_TABLE_START = "<!-- keys: made from the schema by `python -m xdpo.config.key_page docs/config.md` -->"
KEY_TABLE_END = "<!-- end of keys -->"


def with_key_table(page: str) -> str:
    """`page` (docs/config.md's text) with everything between its two key-table markers replaced by
    `markdown_table()`; a page without both markers is refused (`ValueError`)."""
    start, end = page.find(KEY_TABLE_START), page.find(KEY_TABLE_END)
    if start < 0 or end < start:
        raise ValueError(
            f"expected the markers {KEY_TABLE_START!r} and {KEY_TABLE_END!r} around the key table"
        )
    head = page[: start + len(KEY_TABLE_START)]
    return f"{head}\n{markdown_table()}\n{page[end:]}"


def key_table_of(page: str) -> str:
    """The text between `page`'s key-table markers, without the newlines next to them."""
    start = page.index(KEY_TABLE_START) + len(KEY_TABLE_START)
    return page[start : page.index(KEY_TABLE_END, start)].strip("\n")


if __name__ == "__main__":  # python -m xdpo.config.key_page docs/config.md: rewrite the page's key table
    for name in sys.argv[1:]:
        target = Path(name)
        target.write_text(with_key_table(target.read_text()))
        print(f"wrote the key table of {target}")
