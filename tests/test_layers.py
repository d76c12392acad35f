"""The import direction of docs/architecture.md, read from the code with ``ast``.

Every ``import`` and ``from ... import`` in every module counts, including the lazy ones inside
functions: a room may import only the rooms listed for it. A failure names the file, the line
and the import that breaks the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# room -> the rooms it may import (besides itself, the standard library and third-party packages)
ALLOWED = {
    "edge_client": {"edge_client"},
    "server.core": {"edge_client", "server._core", "server._cuda"},
    "server.federation": {"edge_client", "server.core"},
    "server.workloads": {"edge_client", "server.core"},
    "server.runtimes": {"edge_client", "server.core", "server.federation", "server.workloads"},
    "server.bench": {"server.core", "server.workloads.catalog"},
    "server.cli": {"edge_client", "server"},
    "server": {"server.core"},   # the package facade (server/__init__.py)
}
# the runtimes are thin adapters over server.runtimes' shared modules: none imports another
RUNTIMES = ("server.runtimes.simulate", "server.runtimes.experiments", "server.runtimes.flower")
# the protocol package imports neither torch nor flwr at import time (a device needs only numpy +
# safetensors for it; the Flower record helpers import flwr when called)
LIGHT = {"edge_client.wire": {"torch", "flwr", "transformers", "peft"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    for room in sorted(ALLOWED, key=len, reverse=True):
        if module == room or module.startswith(room + "."):
            return room
    raise AssertionError(f"{module} is in no room of ALLOWED; add it to docs/architecture.md and this test")


def _imports(path: Path):
    """(line, imported module, at module level) for every import in the file, relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target, id(node) in top
            for alias in node.names:   # `from server import core` imports server.core
                yield node.lineno, f"{target}.{alias.name}", id(node) in top


def _ours(target: str) -> bool:
    # a bare package name (`from server import _core` also yields "server") is judged by its parts
    return target.split(".")[0] in ("server", "edge_client") and "." in target


def _covered(target: str, rooms: set[str]) -> bool:
    return any(target == r or target.startswith(r + ".") for r in rooms)


FILES = sorted(p for pkg in ("edge_client", "server") for p in (ROOT / pkg).rglob("*.py"))


def test_the_rooms_cover_every_file():
    assert FILES, "no source files found"
    for path in FILES:
        _room(_module_name(path))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_documented_direction(path):
    module = _module_name(path)
    room = _room(module)
    bad = []
    for line, target, top_level in _imports(path):
        if _ours(target) and not _covered(target, {room} | ALLOWED[room]):
            bad.append(f"line {line}: {target} ({room} may import {sorted(ALLOWED[room])})")
        for runtime in RUNTIMES:
            if _covered(module, {runtime}) and _covered(target, set(RUNTIMES) - {runtime}):
                bad.append(f"line {line}: {target} (a runtime imports another runtime)")
        for light, banned in LIGHT.items():
            if top_level and _covered(module, {light}) and target.split(".")[0] in banned:
                bad.append(f"line {line}: {target} ({light} must not need {target.split('.')[0]})")
    assert not bad, f"{path.relative_to(ROOT)} breaks the import direction:\n" + "\n".join(bad)


def test_the_rule_catches_a_violation(tmp_path, monkeypatch):
    """The check above is not vacuous: a core module importing a runtime is caught."""
    fake = ROOT / "server" / "core" / "_layer_probe_tmp.py"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: "from server.runtimes import build\n"
                        if self == fake else Path.read_bytes(self).decode())
    with pytest.raises(AssertionError, match="server.runtimes"):
        test_imports_follow_the_documented_direction(fake)
