"""The server's layers import only downwards: api -> sessions -> engine -> runtime; config, errors, metrics and logs
import none of them; nothing below api imports grpc or the lstm.v1 protobufs."""

from __future__ import annotations

import ast
from pathlib import Path

import lstm_server

PACKAGE = Path(lstm_server.__file__).parent
LAYERS = ["runtime", "engine", "sessions", "api"]  # bottom to top
CROSS_CUTTING = ["config", "errors", "metrics", "logs", "tracing"]


def imported(path: Path) -> set[str]:
    """The absolute names of the modules ``path`` imports (relative imports resolved within lstm_server)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = [node.module] if node.module else []
            if node.level:
                parts = package.split(".")
                base = [*parts[: len(parts) - node.level + 1], *base]
            names.add(".".join(base))
    return names


def part_of(name: str) -> str | None:
    """The layer or cross-cutting module of lstm_server that ``name`` belongs to."""
    parts = name.split(".")
    return parts[1] if parts[0] == "lstm_server" and len(parts) > 1 else None


def test_every_layer_imports_only_the_layers_below_it() -> None:
    for rank, layer in enumerate(LAYERS):
        allowed = set(LAYERS[: rank + 1]) | set(CROSS_CUTTING)
        for path in sorted((PACKAGE / layer).glob("*.py")):
            for name in imported(path):
                assert part_of(name) in allowed | {None}, f"{path.relative_to(PACKAGE)} imports {name}"
                if layer != "api":
                    assert name.split(".")[0] not in ("grpc", "lstm"), f"{path.relative_to(PACKAGE)} imports {name}"


def test_cross_cutting_modules_import_no_layer() -> None:
    for name in CROSS_CUTTING:
        path = PACKAGE / f"{name}.py"
        assert {part_of(n) for n in imported(path)} <= {None, *CROSS_CUTTING}, path.name
        assert not {n.split(".")[0] for n in imported(path)} & {"grpc", "lstm"}, path.name
