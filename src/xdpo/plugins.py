"""Plugins: functions that fill xdpo's registries without the registries importing them.

A plugin spec is "module" (registers on import) or "module:function" (called with no arguments; it
calls the registries' `register_*` functions). Each registry owner loads its group once, the first
time a registry is read by name (`load_group(group, builtin)`), from three sources in order:

1. `builtin`: the owner's own plugins (a failure raises);
2. the apps shipped in `xdpo.apps`: the specs its `PLUGINS[group]` lists (a failure raises); the
   package is found by name, as entry points are, so the library core imports no app;
3. installed distributions' entry points in `group`, each naming such a function (a failure is
   skipped with a warning: a broken third-party plugin must not take the CLI down).

Groups: `xdpo.models` (named models, `xdpo.models.named`) and `xdpo.plugins` (scorers, prompt sets and
sampling defaults, `xdpo.evaluate.plugins`). This module imports nothing from xdpo.
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points

SHIPPED_APPS = "xdpo.apps"

_loaded: dict[str, list[str]] = {}  # group -> the specs loaded so far, in order
_done: set[str] = set()
_loading: set[str] = set()


def run_spec(spec: str) -> None:
    """Import "module" or call "module:function"."""
    module, _, function = spec.partition(":")
    loaded = importlib.import_module(module)
    if function:
        getattr(loaded, function)()


def shipped_specs(group: str) -> tuple[str, ...]:
    """The specs the shipped apps declare for `group` (`xdpo.apps.PLUGINS`); none where no apps ship."""
    try:
        apps = importlib.import_module(SHIPPED_APPS)
    except ModuleNotFoundError as e:
        if e.name != SHIPPED_APPS:
            raise
        return ()
    return tuple(getattr(apps, "PLUGINS", {}).get(group, ()))


def load_group(group: str, builtin: tuple[str, ...] = ()) -> list[str]:
    """Load every plugin of `group` once (later calls return at once); the specs loaded, in order."""
    loaded = _loaded.setdefault(group, [])
    if group in _done or group in _loading:  # loading: a plugin that reads a registry does not recurse
        return list(loaded)
    _loading.add(group)
    try:
        for spec in (*builtin, *shipped_specs(group)):
            if spec not in loaded:
                run_spec(spec)
                loaded.append(spec)
        for ep in entry_points(group=group):
            if ep.value in loaded:  # a shipped app also installed as an entry point
                continue
            try:
                ep.load()()
            except Exception as e:  # a broken third-party plugin must not take the CLI down
                warnings.warn(f"xdpo plugin {ep.name} ({ep.value}) failed to load: {e}", stacklevel=2)
                continue
            loaded.append(ep.value)
        _done.add(group)
    finally:
        _loading.discard(group)
    return list(loaded)
