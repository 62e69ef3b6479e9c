"""The README is one short page for newcomers and the pages under docs/ hold the rest: its size, its two
commands (the ones the Makefile and CI run), links that resolve, and every family and objective named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def quick_start_commands(readme: str) -> list[str]:
    """The commands of the first fenced block under the `## Quick start` heading, comments dropped."""
    section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```bash\n(.*?)^```", section, re.M | re.S)
    assert block, "README's quick start has no ```bash block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def makefile_rule(makefile: str, target: str) -> str:
    """The recipe lines of `target:` in a Makefile (tab-indented lines after the rule)."""
    match = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)*)", makefile, re.M)
    assert match, f"Makefile has no rule {target!r}"
    return match.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of `page`'s headings (outside code blocks), with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            seen.setdefault(f"{base}-{n}" if n else base, 1)
    return set(seen)


def test_the_slug_is_githubs():
    assert slug("Encode once: the latent cache (`xdpo cache`)") == "encode-once-the-latent-cache-xdpo-cache"
    assert (
        slug("What the demo measured (one full run, 2 CPU cores)")
        == "what-the-demo-measured-one-full-run-2-cpu-cores"
    )
    assert slug("MaPO: reference-free") == "mapo-reference-free"


def test_the_readme_is_short():
    size = README.stat().st_size
    assert size < 15_000, f"README.md is {size} bytes; keep it under 15,000 and move detail into docs/"


def test_the_readme_commands_are_the_ones_make_and_ci_run():
    commands = quick_start_commands(README.read_text())
    makefile = (ROOT / "Makefile").read_text()
    header = makefile.split("\n\n", 1)[0]  # "# The two commands of the README: make demo ... make test ..."
    assert commands == re.findall(r"^#\s+(make \w+)\s+-", header, re.M), (
        "README's quick-start commands differ from the two the Makefile's header names"
    )
    assert commands == ["make demo", "make test"]
    assert "xdpo demo" in makefile_rule(makefile, "demo")
    assert "pytest" in makefile_rule(makefile, "test")
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert [line for line in ci if line.startswith("make ")] == [commands[1]], (
        ".ci/run must run the README's test"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_config_exists(page):
    cited = set(re.findall(r"configs/[\w./-]+?\.yaml", page.read_text()))
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, f"{page.relative_to(ROOT)} cites configs that do not exist: {missing}"


def test_every_family_has_a_row_and_a_command_in_the_readme():
    from xdpo.models.families import family_names

    readme = README.read_text()
    for name in family_names():
        row = re.search(rf"^\| `{name}` \| `(configs/[^`]+)` \| `([^`]+)` \|$", readme, re.M)
        assert row, f"README's GPU table has no row for the family {name!r}"
        config, command = row.groups()
        assert (ROOT / config).is_file() and f"--config {config} " in command, row.group(0)


def test_every_objective_divergence_and_outer_loss_is_named_in_the_readme():
    from xdpo.objectives import OUTER_LOSSES
    from xdpo.objectives.divergences import DIVERGENCES
    from xdpo.objectives.registry import objective_names

    readme = README.read_text()
    names = [*objective_names(), *DIVERGENCES, *OUTER_LOSSES]
    missing = [n for n in names if f"`{n}`" not in readme]
    assert not missing, f"README does not name {missing}"


def test_nothing_cites_a_readme_section():
    """The README's sections moved into docs/: a citation such as README "Data" must name the page instead."""
    files = [
        ROOT / "Makefile",
        *ROOT.joinpath("src").rglob("*.py"),
        *ROOT.joinpath("src").rglob("*.yaml"),
        *PAGES,
    ]
    stale = [str(f.relative_to(ROOT)) for f in files if re.search(r"README \(?\"", f.read_text())]
    assert not stale, f"citations of README sections: {stale}"
