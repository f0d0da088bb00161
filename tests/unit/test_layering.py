"""Imports point one way (../shared/STYLE.md): config, files <- kernels <- diffusion, parallel, vae <- checkpoint <- model
<- training, data <- tools <- run (a training run's setup) <- api, demo <- cli. Every import in the package counts, the lazy ones inside
functions too; parts of one level do not import each other.

No import cycles either, inside one part too (STYLE.md 13): a function-local import is allowed only for an
optional third-party dependency, never to hide a cycle. `import_cycles` builds the module-level import graph of
a set of (installed package name -> folder) mappings from the source and reports its strongly connected
components; it runs on the real package and on a synthetic package with a cycle put in on purpose."""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# installed name -> folder (setup.py maps kernels/, data/ and tools/ into the package)
FOLDERS = {"cogvx_mega": ROOT / "cogvx_mega", "cogvx_mega.kernels": ROOT / "kernels",
           "cogvx_mega.data": ROOT / "data", "cogvx_mega.tools": ROOT / "tools"}
# the level of each part; an import may only point to a lower level (or within its own part)
LEVELS = {"config": 0, "files": 0, "kernels": 1, "diffusion": 2, "parallel": 2, "vae": 2, "checkpoint": 3, "model": 4,
          "training": 5, "data": 5, "tools": 6, "run": 7, "api": 8, "demo": 8, "cli": 9, "__init__": 9}


def modules(folders: dict[str, Path] = FOLDERS):
    """(module name, file, is a package's __init__) of every source file under the mapped folders."""
    for package, folder in folders.items():
        for file in sorted(folder.rglob("*.py")):
            relative = file.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            yield ".".join([package, *parts]), file, file.name == "__init__.py"


def part_of(module: str) -> str:
    rest = module.split(".")[1:]
    return rest[0] if rest else "__init__"


def imported(module: str, file: Path, is_package: bool):
    tree = ast.parse(file.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module or node.level else [target]
            yield from (name for name in names if name.startswith("cogvx_mega"))
            if node.module and node.level:
                yield target
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("cogvx_mega"))


def test_imports_point_down():
    upward = []
    for module, file, is_package in modules():
        source = part_of(module)
        for target in imported(module, file, is_package):
            destination = part_of(target)
            if destination in LEVELS and destination != source and LEVELS[destination] >= LEVELS[source]:
                upward.append(f"{module} imports {target}")
    assert upward == [], "\n".join(sorted(set(upward)))


def test_every_part_has_a_level():
    assert {part_of(module) for module, _, _ in modules()} <= set(LEVELS)


# --- import cycles ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportSite:
    """One import statement behind an edge of the import graph."""
    path: str  # the file, relative to its mapped folder's parent
    line: int
    function: str | None  # the enclosing function of a function-local (lazy) import; None at module level
    type_checking: bool  # under `if TYPE_CHECKING:` (still counted: every import statement counts)

    def __str__(self) -> str:
        where = f"function-local import in {self.function}()" if self.function else "top-level import"
        return f"{where}{' under TYPE_CHECKING' if self.type_checking else ''} ({self.path}:{self.line})"


@dataclass(frozen=True)
class ImportEdge:
    source: str
    target: str
    sites: tuple[ImportSite, ...]

    @property
    def function_local(self) -> bool:
        """The edge exists only through imports inside functions."""
        return all(site.function for site in self.sites)

    def __str__(self) -> str:
        sites = "; ".join(map(str, self.sites))
        hides = " -- a function-local import hides a cycle" if any(site.function for site in self.sites) else ""
        return f"{self.source} -> {self.target}: {sites}{hides}"


@dataclass(frozen=True)
class ImportCycle:
    """A strongly connected component of the import graph: every module in it imports itself through the others."""
    modules: tuple[str, ...]  # sorted
    path: tuple[str, ...]  # one shortest cycle through modules[0], ending where it starts
    edges: tuple[ImportEdge, ...]  # every edge between two modules of the component (each lies on a cycle)

    def __str__(self) -> str:
        lines = [f"import cycle among {len(self.modules)} modules: {', '.join(self.modules)}",
                 f"  e.g. {' -> '.join(self.path)}"]
        lines += [f"  {edge}" for edge in self.edges]
        return "\n".join(lines)


class _ImportStatements(ast.NodeVisitor):
    """Every import statement of one file with its enclosing function (if any) and TYPE_CHECKING guard."""

    def __init__(self):
        self.found: list[tuple[ast.Import | ast.ImportFrom, str | None, bool]] = []
        self._functions: list[str] = []
        self._type_checking = 0

    def _visit_function(self, node):
        self._functions.append(node.name)
        self.generic_visit(node)
        self._functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _visit_function

    def visit_If(self, node: ast.If):
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        self.visit(node.test)
        self._type_checking += guarded
        for child in node.body:
            self.visit(child)
        self._type_checking -= guarded
        for child in node.orelse:
            self.visit(child)

    def _record(self, node):
        self.found.append((node, ".".join(self._functions) or None, self._type_checking > 0))

    visit_Import = visit_ImportFrom = _record


def _resolve(name: str, known) -> str | None:
    """The module an import of `name` runs: `name` itself, or the longest known module it lies in."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known) -> set[str]:
    """The modules of `known` one import statement in `module` runs (a package: its __init__ only)."""
    if isinstance(node, ast.Import):
        return {target for alias in node.names if (target := _resolve(alias.name, known))}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    targets = set()
    for alias in node.names:
        submodule = f"{origin}.{alias.name}"
        target = submodule if submodule in known else _resolve(origin, known)
        if target:
            targets.add(target)
    return targets


def import_graph(folders: dict[str, Path]) -> dict[tuple[str, str], list[ImportSite]]:
    """(importer, imported) -> the import statements behind it, over the modules under `folders`. Every import
    statement counts, top-level and inside functions; imports of modules outside `folders` and of a module by
    itself are left out."""
    found = list(modules(folders))
    known = {module for module, _, _ in found}
    parents = {file: folders[package].parent for package in folders for _, file, _ in found
               if file.is_relative_to(folders[package])}
    edges: dict[tuple[str, str], list[ImportSite]] = {}
    for module, file, is_package in found:
        visitor = _ImportStatements()
        visitor.visit(ast.parse(file.read_text(), filename=str(file)))
        for node, function, type_checking in visitor.found:
            site = ImportSite(file.relative_to(parents[file]).as_posix(), node.lineno, function, type_checking)
            for target in sorted(_targets(node, module, is_package, known) - {module}):
                edges.setdefault((module, target), []).append(site)
    return edges


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit); each sorted, in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def enter(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        return node, iter(sorted(graph.get(node, ())))

    for root in sorted(graph):
        if root in index:
            continue
        work = [enter(root)]
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    work.append(enter(successor))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _shortest_cycle(start: str, graph: dict[str, set[str]], members: set[str]) -> tuple[str, ...]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & members):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return (*reversed(path), start)
                if successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{start} is on no cycle")


def import_cycles(folders: dict[str, Path]) -> list[ImportCycle]:
    """Every import cycle among the modules under `folders` (installed package name -> folder)."""
    edges = import_graph(folders)
    graph: dict[str, set[str]] = {module: set() for module, _, _ in modules(folders)}
    for source, target in edges:
        graph[source].add(target)
    cycles = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue
        members = set(component)
        inside = tuple(ImportEdge(source, target, tuple(edges[source, target]))
                       for source in component for target in sorted(graph[source] & members))
        cycles.append(ImportCycle(tuple(component), _shortest_cycle(component[0], graph, members), inside))
    return sorted(cycles, key=lambda cycle: cycle.modules)


def describe(cycles: list[ImportCycle]) -> str:
    return "\n".join(map(str, cycles))


def test_no_import_cycles():
    cycles = import_cycles(FOLDERS)
    assert cycles == [], f"{len(cycles)} import cycle(s):\n{describe(cycles)}"


def _write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, source in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(source))
    return {"pkg": root / "pkg"}


SYNTHETIC = {
    "pkg/__init__.py": "",
    "pkg/a.py": """\
        import json

        import pkg.b


        def value():
            return pkg.b.VALUE + 1
        """,
    "pkg/b.py": """\
        VALUE = 1


        def back():
            from pkg.a import value  # the back edge: a function-local import hiding a cycle
            return value()
        """,
}


def test_checker_catches_a_cycle_hidden_in_a_function(tmp_path):
    cycles = import_cycles(_write_package(tmp_path, SYNTHETIC))
    assert [cycle.modules for cycle in cycles] == [("pkg.a", "pkg.b")]
    (cycle,) = cycles
    assert cycle.path == ("pkg.a", "pkg.b", "pkg.a")
    edges = {(edge.source, edge.target): edge for edge in cycle.edges}
    assert set(edges) == {("pkg.a", "pkg.b"), ("pkg.b", "pkg.a")}
    assert not edges["pkg.a", "pkg.b"].function_local
    assert edges["pkg.a", "pkg.b"].sites == (ImportSite("pkg/a.py", 3, None, False),)
    assert edges["pkg.b", "pkg.a"].function_local
    assert edges["pkg.b", "pkg.a"].sites == (ImportSite("pkg/b.py", 5, "back", False),)
    report = describe(cycles)
    assert "import cycle among 2 modules: pkg.a, pkg.b" in report
    assert "pkg.b -> pkg.a: function-local import in back() (pkg/b.py:5) -- a function-local import hides a cycle" \
        in report
    assert "pkg.a -> pkg.b: top-level import (pkg/a.py:3)\n" in report + "\n"


def test_checker_finds_no_cycle_without_the_back_edge(tmp_path):
    back = "VALUE = 1\n\n\ndef back():\n    import json  # third party: no edge\n    return json\n"
    files = {**SYNTHETIC, "pkg/b.py": back}
    folders = _write_package(tmp_path, files)
    assert import_graph(folders).keys() == {("pkg.a", "pkg.b")}
    assert import_cycles(folders) == []


def test_checker_resolves_imports_to_modules(tmp_path):
    """`from P import m` is an edge to P.m when m is a submodule, else to P; importing a package runs its
    __init__ only; relative imports resolve like absolute ones; a cycle through a package's __init__ counts."""
    folders = _write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.sub.c import C\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "C = 1\n",
        "pkg/sub/d.py": "from pkg.sub import c, missing\nimport pkg.sub\n",
        "pkg/sub/e.py": "from . import d\nfrom .c import C\nfrom .. import sub\n",
        "pkg/sub/f.py": "from pkg import C\n",
        "pkg/sub/g.py": "class G:\n    from pkg.sub import f  # a class body runs at import: top level\n",
    })
    graph = import_graph(folders)
    assert graph.keys() == {("pkg", "pkg.sub.c"), ("pkg.sub.d", "pkg.sub.c"), ("pkg.sub.d", "pkg.sub"),
                            ("pkg.sub.e", "pkg.sub.d"), ("pkg.sub.e", "pkg.sub.c"), ("pkg.sub.e", "pkg.sub"),
                            ("pkg.sub.f", "pkg"), ("pkg.sub.g", "pkg.sub.f")}
    assert graph["pkg.sub.g", "pkg.sub.f"] == [ImportSite("pkg/sub/g.py", 2, None, False)]
    assert import_cycles(folders) == []
    (tmp_path / "pkg/sub/c.py").write_text("import pkg.sub.f\n")  # pkg -> pkg.sub.c -> pkg.sub.f -> pkg
    (cycle,) = import_cycles(folders)
    assert cycle.modules == ("pkg", "pkg.sub.c", "pkg.sub.f")
    assert cycle.path == ("pkg", "pkg.sub.c", "pkg.sub.f", "pkg")
    assert not any(edge.function_local for edge in cycle.edges)


def test_strongly_connected_components():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": {"a"}, "g": set()}
    assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["d", "e"], ["f"], ["g"]]
    chain = {str(i): {str(i + 1)} for i in range(5000)} | {"5000": {"0"}}  # deeper than the recursion limit
    assert [len(component) for component in strongly_connected(chain)] == [5001]
