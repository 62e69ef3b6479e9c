"""The package's structure: no import cycles, the layer rules (models import neither the apps nor evaluate;
the library core never imports `xdpo.apps`, which it reaches only as plugins), docs cited.

Imports are read from the source (every `import xdpo...` / `from xdpo... import`, at module level or
inside functions), so a cycle hidden in a function-level import counts too.
"""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC.parent
CHECKED = (
    "xdpo.evaluate",
    "xdpo.apps",
    "xdpo.data",
    "xdpo.objectives",
    "xdpo.models",
    "xdpo.pairs",
    "xdpo.plugins",
)


def modules() -> dict[str, Path]:
    found = {}
    for f in (SRC / "xdpo").rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the xdpo modules it imports (a name imported from a package counts as its submodule)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("xdpo")
            ):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("xdpo")}
        graph[name] = {e for e in edges if e in mods and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_through_evaluate_apps_data_objectives_models_pairs():
    bad = [c for c in cycles(import_graph()) if any(m.startswith(CHECKED) for m in c)]
    assert not bad, f"import cycles: {bad}"


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


APPS = "xdpo.apps"
COMPOSITION = ("xdpo.cli", "xdpo.__main__")  # the CLI: lists every command, the apps' too
# The one place the core names the apps package: it reads the shipped apps' PLUGINS as entry points.
DISCOVERY = {"xdpo.plugins": {APPS}}


def under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(graph: dict[str, set[str]], importers, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """{module of `importers` (package prefixes, or a set of modules): the modules under `forbidden` it
    imports}, where any."""
    chosen = importers.__contains__ if isinstance(importers, set) else lambda m: under(m, importers)
    found = {m: sorted(e for e in edges if under(e, forbidden)) for m, edges in graph.items()}
    return {m: e for m, e in found.items() if e and chosen(m)}


def core(graph: dict[str, set[str]]) -> set[str]:
    """The library core: every module outside the apps and the CLI composition modules."""
    return {m for m in graph if not under(m, (APPS, *COMPOSITION))}


def named_modules(path: Path) -> set[str]:
    """String literals in a module that name an xdpo.apps module or plugin spec ("xdpo.apps.x:fn")."""
    spec = re.compile(r"^xdpo\.apps(\.\w+)*(:\w+)?$")
    return {
        n.value
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and spec.match(n.value)
    }


def test_the_layer_checker_finds_violations():
    graph = {"xdpo.models.load": {"xdpo.apps.digits", "xdpo.errors"}, "xdpo.apps.demo.run": {"xdpo.models"}}
    assert violations(graph, ("xdpo.models",), (APPS,)) == {"xdpo.models.load": ["xdpo.apps.digits"]}
    assert violations(graph, ("xdpo.model",), (APPS,)) == {}  # a prefix is a whole package name
    assert core({**graph, "xdpo.cli": {APPS}, "xdpo": set()}) == {"xdpo.models.load", "xdpo"}
    assert violations({**graph, "xdpo": set()}, {"xdpo"}, (APPS,)) == {}  # a set: those modules only


def test_models_import_neither_the_apps_nor_evaluate():
    assert violations(import_graph(), ("xdpo.models",), (APPS, "xdpo.evaluate")) == {}


def test_the_library_core_never_imports_the_apps():
    graph = import_graph()
    assert violations(graph, core(graph), (APPS,)) == {}
    mods = modules()
    named = {m: named_modules(mods[m]) - DISCOVERY.get(m, set()) for m in core(graph)}
    assert {m: n for m, n in named.items() if n} == {}  # nor loads one by name (importlib)
    assert "xdpo.apps.digits.cli" in named_modules(mods["xdpo.cli"])  # the finder finds names


def test_the_demo_and_study_load_denoisers_through_the_models_api():
    assert violations(import_graph(), ("xdpo.apps",), ("xdpo.models.padding",)) == {
        "xdpo.apps.digits.flow_base": ["xdpo.models.padding"]  # builds with the collapsed processor
    }


def test_parse_digit_lives_with_the_captions():
    from xdpo.apps.digits import data, labeller

    assert labeller.parse_digit is data.parse_digit
    assert "xdpo.apps.digits.labeller" not in import_graph()["xdpo.apps.digits.data"]


def test_plugins_register_scorers_prompt_sets_and_named_models():
    from xdpo.evaluate.pipeline import MODEL_SAMPLING
    from xdpo.evaluate.plugins import load_plugins
    from xdpo.evaluate.prompts import PROMPT_SETS
    from xdpo.evaluate.scorers import SCORERS

    assert "xdpo.apps.digits.evaluation:register" in load_plugins()  # a shipped app's, by name
    assert {"digits-reward", "digits-alignment", "pickscore", "hpsv2.0"} <= set(SCORERS)
    assert {"digits", "parti", "hpsv2", "pickapic-test"} <= set(PROMPT_SETS)
    from xdpo.apps.digits import DIGITS_SAMPLING

    assert MODEL_SAMPLING["digits"] == DIGITS_SAMPLING


class EntryPoint:
    def __init__(self, name: str, fn) -> None:
        self.name, self.value, self.fn = name, f"thirdparty:{name}", fn

    def load(self):
        return self.fn


def fresh_group(monkeypatch, group: str, eps: list[EntryPoint]) -> None:
    """`group` not loaded yet, with `eps` as the installed entry points (of that group only)."""
    import xdpo.plugins as xp

    monkeypatch.setattr(xp, "_done", xp._done - {group})
    monkeypatch.setattr(xp, "_loaded", {**xp._loaded, group: []})
    monkeypatch.setattr(xp, "entry_points", lambda **kw: eps if kw["group"] == group else [])


def test_third_party_plugins_load_and_a_broken_one_only_warns(monkeypatch):
    from xdpo.evaluate import plugins
    from xdpo.evaluate.prompts import PROMPT_SETS, register_prompt_set

    def good() -> None:
        register_prompt_set("thirdparty-set", lambda: ["a prompt"])

    def broken() -> None:
        raise RuntimeError("boom")

    fresh_group(monkeypatch, plugins.GROUP, [EntryPoint("good", good), EntryPoint("bad", broken)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = plugins.load_plugins()
    assert "thirdparty:good" in loaded and "thirdparty:bad" not in loaded
    assert any("plugin bad" in str(w.message) and "boom" in str(w.message) for w in caught)
    assert PROMPT_SETS.pop("thirdparty-set")() == ["a prompt"]


def test_named_models_come_from_plugins(monkeypatch, tmp_path):
    from xdpo.apps.digits import base_model_path
    from xdpo.models import named
    from xdpo.models.load import resolve_pretrained

    def toy() -> None:
        named.register_named_model("thirdparty-model", lambda: tmp_path)

    monkeypatch.setattr(named, "NAMED_MODELS", {})
    fresh_group(monkeypatch, named.GROUP, [EntryPoint("toy", toy)])
    assert set(named.named_models()) == {"digits", "digits-flow", "thirdparty-model"}
    assert resolve_pretrained("digits") == str(base_model_path())
    assert resolve_pretrained("thirdparty-model") == str(tmp_path)
    assert resolve_pretrained("owner/unnamed") == "owner/unnamed"  # a hub id passes through


def test_one_pipeline_loader():
    from xdpo.apps.digits import sampling
    from xdpo.evaluate import pipeline

    assert sampling.initial_latents is pipeline.initial_latents
    text = (SRC / "xdpo" / "apps" / "digits" / "sampling.py").read_text()
    assert "from_pretrained" not in text  # the digits world loads through evaluate.pipeline.load_pipeline


@pytest.mark.parametrize("folder", ["src", "tests", "benchmarks"])
def test_no_file_cites_design_md(folder):
    """DESIGN.md was an internal file users do not have; the design and math live in docs/."""
    cited = [
        str(f.relative_to(ROOT))
        for f in (ROOT / folder).rglob("*")
        if f.is_file()
        and f.suffix in (".py", ".yaml", ".md", ".txt", ".json")
        and f.name != Path(__file__).name
        if "DESIGN" + ".md" in f.read_text(errors="ignore")
    ]
    assert not cited
    assert (ROOT / "docs" / "design.md").is_file() and (ROOT / "docs" / "math.md").is_file()
    assert "DESIGN" + ".md" not in (ROOT / "README.md").read_text()


LAYERS = (
    ("xdpo.errors", "xdpo.plugins", "xdpo.quiet", "xdpo.config.options"),  # `Option`: keys components declare
    ("xdpo.objectives", "xdpo.models"),  # pure losses and registries; model families, loading, noise
    ("xdpo.config",),  # typed config; its sections and choices read the registries (by name above it)
    ("xdpo.data",),
    ("xdpo.train", "xdpo.evaluate"),  # the training recipe never imports scorers or samplers (rollout)
    ("xdpo.rollout",),  # the rollout engine, rewards, rounds and validation (handed to the recipe by name)
    ("xdpo.pairs", "xdpo.export"),  # `xdpo pairs` / `relabel` (users of the rollout engine); `xdpo export`
    ("xdpo", "xdpo.cli", "xdpo.__main__", "xdpo.apps"),  # composition and the users of the library
)
"""The library's layers, bottom first: a module imports only modules of its own package or of lower layers."""


def layer_of(module: str) -> int:
    best = max((p for layer in LAYERS for p in layer if under(module, (p,))), key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'importer -> imported' for every import of a module in a higher layer (or of a sibling package in
    the same layer), e.g. a train module importing a scorer."""
    found = []
    for m, edges in graph.items():
        for e in sorted(edges):
            same_package = e.split(".")[:2] == m.split(".")[:2]
            if (
                not same_package
                and m != "xdpo"
                and layer_of(e) >= layer_of(m)
                and layer_of(m) < len(LAYERS) - 1
            ):
                found.append(f"{m} -> {e}")
    return found


def test_the_layer_rule_finds_an_upward_import():
    graph = {"xdpo.train.recipe": {"xdpo.rollout.rewards", "xdpo.data.batch"}, "xdpo.data.batch": set()}
    assert upward_imports(graph) == ["xdpo.train.recipe -> xdpo.rollout.rewards"]
    assert upward_imports({"xdpo.models.load": {"xdpo.apps.digits"}}) == [
        "xdpo.models.load -> xdpo.apps.digits"
    ]
    assert upward_imports({"xdpo.train.step": {"xdpo.evaluate.sample"}}) == [
        "xdpo.train.step -> xdpo.evaluate.sample"
    ]


def test_no_module_reaches_up_a_layer():
    """models never import digits or evaluate; the recipe never imports pairs, evaluate or rollout; data never
    imports train; and so on (LAYERS)."""
    assert upward_imports(import_graph()) == []
