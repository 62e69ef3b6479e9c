"""Applications built on the xdpo library: the digits world (`digits`), `xdpo demo` (`demo`) and
`xdpo study` (`study`). The library core never imports this package; the CLI lists their commands."""
