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


def attribute_writes(path: Path) -> list[tuple[str, str, int]]:
    """(the written attribute, the name of the object written, line) of every ``x.attr = ...``, ``x.attr += ...``
    and ``x.attr.append(...)``-style call in ``path``."""
    writes = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("append", "clear", "extend", "pop", "remove") and isinstance(
                node.func.value, ast.Attribute
            ):
                targets = [node.func.value]
        writes += [(t.attr, ast.unparse(t.value), node.lineno) for t in targets if isinstance(t, ast.Attribute)]
    return writes


def own_fields(path: Path, cls: str) -> set[str]:
    """The attributes class ``cls`` of ``path`` sets on ``self``."""
    (node,) = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == cls]
    return {attr for attr, owner, _ in attribute_writes_in(node) if owner == "self"}


def attribute_writes_in(tree: ast.AST) -> list[tuple[str, str, int]]:
    found = []
    for node in ast.walk(tree):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        found += [(t.attr, ast.unparse(t.value), node.lineno) for t in targets if isinstance(t, ast.Attribute)]
    return found


def test_nothing_outside_the_turn_module_writes_a_turn_s_fields() -> None:
    """A turn's fields have one writer each, all in engine/turn.py: elsewhere no attribute that only a Turn has is
    assigned or mutated (a name another class also sets, such as ``tokens_seen``, is that class's own)."""
    turn_module = PACKAGE / "engine" / "turn.py"
    fields = own_fields(turn_module, "Turn")
    others = set()
    for path in PACKAGE.rglob("*.py"):
        if path != turn_module:
            tree = ast.parse(path.read_text())
            others |= {attr for attr, owner, _ in attribute_writes_in(tree) if owner == "self"}
            others |= {  # dataclass fields
                n.target.id
                for c in ast.walk(tree)
                if isinstance(c, ast.ClassDef)
                for n in c.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
            }
    only_turns = fields - others
    assert {"pending", "outbox", "buffered", "cancelled", "remaining", "model_calls", "first_at"} <= only_turns
    for path in PACKAGE.rglob("*.py"):
        if path == turn_module:
            continue
        bad = [(attr, owner, line) for attr, owner, line in attribute_writes(path) if attr in only_turns]
        assert not bad, f"{path.relative_to(PACKAGE)} writes a turn's fields: {bad}"


def test_only_the_session_manager_moves_a_session_s_phase() -> None:
    for path in PACKAGE.rglob("*.py"):
        writes = [(owner, line) for attr, owner, line in attribute_writes(path) if attr == "phase"]
        if path == PACKAGE / "sessions" / "manager.py":
            assert len(writes) == 1, writes  # in _move
        else:
            assert not writes, f"{path.relative_to(PACKAGE)} writes a session's phase: {writes}"
