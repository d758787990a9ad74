"""The layout shows the architecture: rooms import downward only (no cycles between
them), transplant_core knows nothing of serving, and no file in server/ is over about
400 lines. Read from the source with ast: every import counts, at the top of a module
or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# lowest first; a module may import its own room and lower ones
RANK = {
    "transplant_core": 0,
    "server._gen": 0, "server.rpc": 1, "server.protogen": 1, "server.config": 1, "server.metrics": 1,
    "server.auth": 1,
    "server.donors": 2, "server.generations": 2,
    "server.engines": 3, "server.quality": 3,
    "server.fleet": 4,
    "server.control": 5,
    "server.runtime": 6,
    "server.api": 7,
    "server.app": 8,
    "server.plugin": 9,
    "server.cli": 10,
}
SERVING = ("grpc", "prometheus_client", "http", "urllib", "server", "fastapi", "uvicorn", "socketserver")
MAX_LINES = 400


def _room(mod: str) -> str | None:
    parts = mod.split(".")
    if parts[0] == "transplant_core":
        return "transplant_core"
    if parts[0] != "server" or len(parts) == 1:
        return None
    return ".".join(parts[:2])


def _imports():
    """(importing module, imported module) for every import in server/ and transplant_core/."""
    for pkg in ("server", "transplant_core"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if "_gen" in f.parts:
                continue
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mod = ".".join(parts[:-1] if is_pkg else parts)
            here = parts[:-1]
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    for a in node.names:
                        yield mod, a.name
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = here[:len(here) - node.level + 1]
                        yield mod, ".".join(base + ([node.module] if node.module else []))
                    else:
                        yield mod, node.module


def test_rooms_import_downward_only():
    rooms = {r for m, _ in _imports() if (r := _room(m))}
    assert rooms <= set(RANK), f"rooms with no place in the layering: {sorted(rooms - set(RANK))}"
    upward = sorted({f"{m} -> {t}" for m, t in _imports()
                     if (a := _room(m)) and (b := _room(t)) and a != b and RANK[b] >= RANK[a]})
    assert not upward, "imports that go up or sideways between rooms:\n" + "\n".join(upward)


def test_every_import_of_ours_resolves():
    """A moved module leaves no import behind that names its old place (also those
    inside functions, which only fail when they run)."""
    import importlib.util

    missing = sorted({f"{m} -> {t}" for m, t in _imports()
                      if t and t.split(".")[0] in ("server", "transplant_core") and importlib.util.find_spec(t) is None})
    assert not missing, "\n".join(missing)


def test_transplant_core_knows_nothing_of_serving():
    bad = sorted({f"{m} -> {t}" for m, t in _imports()
                  if m.startswith("transplant_core") and t.split(".")[0] in SERVING})
    assert not bad, "\n".join(bad)


def test_no_file_in_server_is_over_400_lines():
    long = {str(f.relative_to(ROOT)): n for f in (ROOT / "server").rglob("*.py")
            if "_gen" not in f.parts and (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_room_says_what_it_owns():
    """Each package's opening docstring says what the room owns."""
    for init in sorted((ROOT / "server").rglob("__init__.py")):
        if "_gen" in init.parts or init.parent == ROOT / "server":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 60, f"{init.relative_to(ROOT)} has no opening docstring saying what it owns"
