"""The package's architecture as a test: imports only go downward, no circles, no huge modules.

Layers, lowest first (DESIGN-notes.md, "Layers"): the foundation modules
(version, errors, logs), wire, config, pooling, admin, proc, dev, then the
command line. A module may import its own layer and those below. The sidecar
talks to the pooler only through the admin console, so of the pooler it may
import only the foundation, wire and config.

Runtime imports count, also those inside functions (a lazy import that runs is
still a dependency); only `if TYPE_CHECKING:` blocks are left out.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 600

LAYERS = {
    "pooler": 0, "pooler.version": 0, "pooler.errors": 0, "pooler.logs": 0,
    "pooler.wire": 1, "pooler.config": 2, "pooler.pooling": 3, "pooler.admin": 4,
    "pooler.proc": 5, "pooler.dev": 6, "pooler.cli": 7, "pooler.__main__": 7,
}
SIDECAR_MAY_IMPORT = {"pooler", "pooler.version", "pooler.errors", "pooler.logs",
                      "pooler.wire", "pooler.config"}


def modules(root: pathlib.Path, pkgs: tuple[str, ...]) -> dict[str, pathlib.Path]:
    out = {}
    for pkg in pkgs:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(name: str, path: pathlib.Path, mods: dict[str, pathlib.Path]) -> set[str]:
    """The modules of `mods` that `name` imports at run time."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def known(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if (m := known(alias.name)) is not None:
                        found.add(m)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package[:len(package) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in child.names:          # `from pkg import mod` names a module
                    if (m := known(f"{base}.{alias.name}" if base else alias.name)) is not None:
                        found.add(m)
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def graph(root: pathlib.Path, pkgs: tuple[str, ...]) -> dict[str, set[str]]:
    mods = modules(root, pkgs)
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strongconnect(v)
    return out


def layer_of(module: str) -> tuple[str, int]:
    """The layer a pooler module belongs to: the longest prefix named in LAYERS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return prefix, LAYERS[prefix]
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and DESIGN-notes.md")


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(g.items()):
        for dep in sorted(deps):
            if mod.startswith("sidecar"):
                if dep.startswith("pooler") and layer_of(dep)[0] not in SIDECAR_MAY_IMPORT:
                    bad.append(f"{mod} imports {dep}: the sidecar reaches the pooler only "
                               f"through the admin console")
                continue
            if dep.startswith("sidecar"):
                bad.append(f"{mod} imports {dep}")
                continue
            (mine, rank), (theirs, dep_rank) = layer_of(mod), layer_of(dep)
            if dep_rank > rank:
                bad.append(f"{mod} ({mine}) imports {dep} ({theirs}): an upward import; "
                           f"pass a callback or an injected object instead")
    return bad


def test_no_import_circles():
    assert circles(graph(ROOT, ("pooler", "sidecar"))) == []


def test_imports_only_go_downward():
    assert violations(graph(ROOT, ("pooler", "sidecar"))) == []


def test_no_module_over_600_lines():
    big = {name: len(path.read_text().splitlines())
           for name, path in modules(ROOT, ("pooler", "sidecar")).items()}
    assert {n: lines for n, lines in big.items() if lines > MAX_LINES} == {}


def test_the_checks_see_circles_and_upward_imports(tmp_path):
    """The checks above are only as good as the graph: build a package that breaks
    both rules, through a lazy import and a relative one, and see both caught."""
    pkg = tmp_path / "pooler"
    (pkg / "wire").mkdir(parents=True)
    (pkg / "pooling").mkdir()
    for d in (pkg, pkg / "wire", pkg / "pooling"):
        (d / "__init__.py").write_text("")
    (pkg / "wire" / "a.py").write_text("def f():\n    from pooler.pooling import b\n")
    (pkg / "pooling" / "b.py").write_text("from ..wire import a\nfrom typing import TYPE_CHECKING\n"
                                          "if TYPE_CHECKING:\n    from pooler.proc import c\n")
    g = graph(tmp_path, ("pooler",))
    assert g["pooler.wire.a"] == {"pooler.pooling.b"} and g["pooler.pooling.b"] == {"pooler.wire.a"}
    assert circles(g) == [["pooler.pooling.b", "pooler.wire.a"]]
    assert violations(g) == ["pooler.wire.a (pooler.wire) imports pooler.pooling.b (pooler.pooling): "
                             "an upward import; pass a callback or an injected object instead"]


def test_the_serving_pooler_does_not_load_client_libraries():
    """psycopg2 (the capacity check of check-config, the tests) costs a serving pooler
    ~5 MB of RSS per process: the serving path must not import it."""
    import subprocess
    import sys
    code = ("import sys, pooler.cli, pooler.proc.master, pooler.pooling.worker; "
            "print('psycopg2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "False"
