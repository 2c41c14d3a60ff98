"""The layers of koala/ as its imports say them: no circle, no arrow up.

Every module's imports are read with ``ast``, in three kinds: at the top of the module,
inside a function (``lazy``: loaded on first call, a way to hide a circle), and under
``if TYPE_CHECKING:`` (``typing``: for annotations only, never loaded). The first two
are what runs; they must form no circle and point down the layers below. The third
kind may name a type of a higher layer, but only where declared in TYPING_UP.
Importing ``koala.a.b`` runs ``koala/a/__init__.py`` too, so a circle through a
sub-package's facade counts (the root facade, ``koala/__init__.py``, runs first
whatever is imported, and is left out of the circle search).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import koala

ROOT = Path(koala.__file__).parent

# Lowest first. A module belongs to the longest entry naming it or a package above it
# (the root facade, "koala", names only itself). See docs/design.md, "Layers".
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "leaves",
        (
            "koala._errors",
            "koala._annotations",
            "koala._metrics",
            "koala._tracing",
            "koala._codec",
            "koala._config",
            "koala._backend",
            "koala._tls",
            "koala._net",
            "koala._messages",
            "koala._loop",
            "koala._drive",
        ),
    ),
    ("wire", ("koala.wire",)),
    ("storage", ("koala.storage",)),
    (
        "actors and seams",
        ("koala._interface", "koala._context", "koala._seams", "koala._proxy", "koala._actor"),
    ),
    ("transport and placement", ("koala.transport", "koala.pd")),
    ("host runtime", ("koala.host",)),
    ("gateway and http", ("koala.gateway", "koala.http", "koala.dashboard", "koala.pd.server")),
    ("processes", ("koala._host", "koala.cli", "koala._flags", "koala._app", "koala._logging")),
    ("facade", ("koala",)),
    ("test kit", ("koala.testing",)),
)

# Runtime imports up the layers that are still there, each to go (issue #16).
KNOWN_UP: dict[tuple[str, str], str] = {}

# Annotations that name a type of a higher layer (never imported when running).
TYPING_UP: dict[tuple[str, str], str] = {
    ("koala._actor", "koala.host"): "ActorBase delegates to its activation",
    ("koala.storage._state", "koala._actor"): "a state handle belongs to an actor",
}

CORE = ("leaves", "actors and seams", "host runtime")

Kind = Literal["top", "lazy", "typing"]


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    kind: Kind
    line: int


def _module_name(path: Path) -> str:
    parts = ["koala", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    # `from koala import _errors` imports the module koala._errors
    found = [f"{origin}.{a.name}" for a in node.names if f"{origin}.{a.name}" in MODULES]
    return found if len(found) == len(node.names) else [origin, *found]


def _imports(module: str) -> list[Import]:
    out: list[Import] = []

    def visit(node: ast.AST, kind: Kind) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, child):
                    if target == "koala" or target.startswith("koala."):
                        out.append(Import(module, target, kind, child.lineno))
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), "typing")
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), kind)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "typing" if kind == "typing" else "lazy")
            else:
                visit(child, kind)

    visit(ast.parse(MODULES[module].read_text(), str(MODULES[module])), "top")
    return out


IMPORTS = [imp for module in MODULES for imp in _imports(module)]


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (length of the entry, layer)
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            names = module == entry or (entry != "koala" and module.startswith(entry + "."))
            if names and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def _up(kinds: set[Kind]) -> set[tuple[str, str]]:
    edges = set()
    for imp in IMPORTS:
        if imp.kind in kinds and imp.target in MODULES:
            source, target = layer_of(imp.source), layer_of(imp.target)
            if source is not None and target is not None and target > source:
                edges.add((imp.source, imp.target))
    return edges


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, f"declare the layer of {missing} in LAYERS (tests/test_layers.py)"


def test_the_imports_are_read() -> None:  # the reader itself: a few known facts
    kinds = {(i.source, i.target): i.kind for i in IMPORTS}
    assert kinds[("koala.host._runtime", "koala.host._catalog")] == "top"
    assert kinds[("koala._actor", "koala.host")] == "typing"
    assert kinds[("koala.cli", "koala._app")] == "lazy"
    assert ("koala._messages", "koala._errors") in kinds  # from . import _errors


def test_no_import_circle() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.kind == "typing" or imp.target not in MODULES:
            continue
        # importing a module runs the facades of the packages above it (but the
        # importer's own packages have run already, and the root one always has)
        above = set(_parents(imp.source)) | {imp.source}
        for target in [*_parents(imp.target), imp.target]:
            if target not in above and target != "koala":
                graph[imp.source].add(target)
    # depth-first search; a back edge closes a circle
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    circles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_imports_point_down() -> None:
    up = _up({"top", "lazy"})
    new = sorted(up - KNOWN_UP.keys())
    assert not new, f"imports up the layers (see LAYERS): {new}"
    gone = sorted(KNOWN_UP.keys() - up)
    assert not gone, f"these known exceptions are fixed: remove them from KNOWN_UP: {gone}"


def test_annotations_name_higher_layers_only_where_declared() -> None:
    up = _up({"typing"})
    new = sorted(up - TYPING_UP.keys())
    assert not new, f"TYPE_CHECKING imports up the layers: {new} (declare why in TYPING_UP)"
    gone = sorted(TYPING_UP.keys() - up)
    assert not gone, f"remove from TYPING_UP, no longer imported: {gone}"


def test_the_core_imports_at_the_top() -> None:
    """An import inside a function is how a circle hides: the core has none. (The
    packages defer the imports of optional drivers, psycopg and etcd, this way.)"""
    core = {i for i, (name, _) in enumerate(LAYERS) if name in CORE}
    lazy = sorted(
        f"{i.source}:{i.line} -> {i.target}"
        for i in IMPORTS
        if i.kind == "lazy" and layer_of(i.source) in core
    )
    assert not lazy, f"function-local imports in the core: {lazy}"


def test_nothing_in_koala_imports_the_test_kit() -> None:
    users = sorted(
        {i.source for i in IMPORTS if i.target.startswith("koala.testing")}
        - {m for m in MODULES if m.startswith("koala.testing")}
    )
    assert not users, f"{users} import koala.testing"


# bench/ modules that still import a private name
BENCH_PRIVATE: set[tuple[str, str]] = set()


def test_the_benchmarks_import_only_public_names() -> None:
    """A benchmark that imports privates breaks on every refactor, when it is needed."""
    bench = ROOT.parent / "bench"
    private = set()
    for path in sorted(bench.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "koala" and any(p.startswith("_") for p in parts):
                    module = ".".join(
                        parts[: next(i for i, p in enumerate(parts) if p[0] == "_") + 1]
                    )
                    private.add((f"bench.{path.stem}", module))
    assert private == BENCH_PRIVATE, f"private imports in bench/: {sorted(private - BENCH_PRIVATE)}"


# A module a newcomer can read at one sitting: about 600 lines at most (issue #16).
MAX_MODULE_LINES = 620


def test_no_module_outgrows_a_sitting() -> None:
    sizes = {
        str(path.relative_to(ROOT.parent)): len(path.read_text().splitlines())
        for path in ROOT.rglob("*.py")
    }
    assert sizes, "no module found"
    too_long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"split these by concern: {too_long}"
