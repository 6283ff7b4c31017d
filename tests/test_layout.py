"""The package's layout: every module imports only downward, and the core's modules stay readable.

The import graph is read from the source (``ast``: nothing is imported), with
every ``import`` counted, those inside functions too: a circle that a local
import hides is still a circle.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clair_jax"

#: The core is the package less its outer rooms that hold experiments and a language model.
OUTSIDE_CORE = ("experiments", "llm")
#: Lines a module of the core may hold.
MAX_LINES = 500
#: Modules over the limit whose split is another piece of work: the file and where it is tracked.
#: Remove an entry once its module is split.
NOT_YET_SPLIT: dict = {}


def _modules():
    """{dotted name: path} of every module of clair_jax."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph():
    """{module: set of clair_jax modules it imports}."""
    modules = _modules()

    def known(name):   # the module itself, or the package a name is taken from
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names if alias.name.startswith("clair_jax")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:   # relative: from the package, one level up per extra dot
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                if base.startswith("clair_jax"):
                    # ``from clair_jax import detect`` imports the module detect.
                    targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base)
                                for a in node.names}
        graph[name] = targets - {name, None}
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_clair_jax():
    graph = import_graph()
    # detect and refine take what they share from the modules below them, not from each other.
    assert {"clair_jax.robust", "clair_jax.basis"} <= graph["clair_jax.detect"]
    assert "clair_jax.detect" not in graph["clair_jax.refine"]
    assert "clair_jax.refine" not in graph["clair_jax.detect"]
    found = cycles(graph)
    assert not found, f"import circles: {found}"


def test_core_modules_stay_readable():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        inner = path.relative_to(PACKAGE)
        if inner.parts[0] in OUTSIDE_CORE or str(inner) in NOT_YET_SPLIT:
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            long.append(f"{inner}: {lines}")
    assert not long, f"core modules over {MAX_LINES} lines: {long}"


def test_flower_rooms_stay_small():
    # The Flower integration is a package of small rooms (strategy, bank, replies, verdicts, options, timing).
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "flower").glob("*.py")}
    assert max(sizes.values()) < 250, sizes
