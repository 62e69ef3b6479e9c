"""Applications built on the xdpo library: the digits world (`digits`), `xdpo demo` (`demo`) and
`xdpo study` (`study`). The library core never imports this package: the CLI lists the apps' commands,
and the core's registries find what the apps add through `PLUGINS`, read by name by `xdpo.plugins`
as installed entry points are (group -> plugin specs, "module:function")."""

PLUGINS: dict[str, tuple[str, ...]] = {
    "xdpo.models": ("xdpo.apps.digits:register_named_models",),  # model.pretrained=digits / digits-flow
    "xdpo.plugins": ("xdpo.apps.digits.evaluation:register",),  # digits scorers, prompts, sampling defaults
}
