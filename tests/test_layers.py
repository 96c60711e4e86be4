"""Imports only go down. Every `import` of a stabbench module in stabbench/ (function-level
ones included) is read with `ast`, and each module is placed in a layer; an import from a
lower layer into a higher one fails this test. Plugins (methods, datasets) do not import
each other's families either.

KNOWN_UPWARD is for an edge that must stay for a while (none now): a ratchet, since a new
upward edge fails and an edge that is gone must be struck from it. The layers are those of
today's flat modules; when they move into folders by layer (issue 22), LAYERS names the folders.
"""
from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stabbench"

# Lowest first: a module may import from its own layer and those before it.
LAYERS = [
    ("base", ["stabbench", "stabbench.errors"]),
    ("core", ["stabbench.devices", "stabbench.model", "stabbench.ensemble", "stabbench.fast", "stabbench.mean_field",
              "stabbench.progress", "stabbench.locks", "stabbench.outputs", "stabbench.lr_grid"]),
    ("plugins", ["stabbench.methods", "stabbench.methods.*", "stabbench.datasets", "stabbench.datasets.*"]),
    ("measures", ["stabbench.probe_theory"]),
    ("results", ["stabbench.checkpoint"]),
    ("training", ["stabbench.train", "stabbench.memory"]),
    ("probe and bench", ["stabbench.probe", "stabbench.bench"]),
    ("report", ["stabbench.report", "stabbench.tuning", "stabbench.phase_diagram", "stabbench.plots"]),
    ("cli", ["stabbench.cli", "stabbench.app", "stabbench.commands", "stabbench.callbacks", "stabbench.config"]),
]
PLUGIN_FAMILIES = ["stabbench.methods", "stabbench.datasets"]

KNOWN_UPWARD: set[tuple[str, str]] = set()  # the flat layout's last ones are gone; keep it empty


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.with_suffix("").relative_to(package.parent).parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every stabbench module `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stabbench":
            if node.module == "stabbench":  # `from stabbench import x`: x may be a module
                found |= {f"stabbench.{a.name}" if (package / f"{a.name}.py").exists() or (package / a.name).is_dir()
                          else "stabbench" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "stabbench"}
    return found


def layer_of(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(module == p or fnmatch(module, p) for p in patterns):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def family(module: str) -> str | None:
    return next((f for f in PLUGIN_FAMILIES if module == f or module.startswith(f + ".")), None)


def wrong_edges(package: Path = PACKAGE) -> set[tuple[str, str]]:
    edges = set()
    for path in sorted(package.rglob("*.py")):
        source = module_name(path, package)
        for target in imports(path, package):
            if target == source:
                continue
            upward = layer_of(target) > layer_of(source)
            across = family(source) and family(target) and family(source) != family(target)
            if upward or across:
                edges.add((source, target))
    return edges


def test_imports_only_go_down():
    edges = wrong_edges()
    new = sorted(edges - KNOWN_UPWARD)
    assert not new, "imports that go up a layer or across plugin families: " + ", ".join(f"{a} -> {b}" for a, b in new)
    gone = sorted(KNOWN_UPWARD - edges)
    assert not gone, "edges no longer there: strike them from KNOWN_UPWARD: " + ", ".join(f"{a} -> {b}" for a, b in gone)


def test_a_planted_upward_import_is_caught(tmp_path):
    """The checker itself: a copy of the package with one function-level upward import."""
    import shutil

    copy = tmp_path / "stabbench"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    model = copy / "model.py"
    model.write_text(model.read_text() + "\n\ndef _planted():\n    from stabbench import report\n")
    assert wrong_edges(copy) - wrong_edges() == {("stabbench.model", "stabbench.report")}
