"""The package's folders are layers, and imports only go down: a stage may use the stages and the
storage below it, never one above it or a peer beside it. Imports inside functions count too (they
are how cycles hide). The walk reads the source (AST), so it runs without TensorFlow."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featurepipe"

# Bottom to top. Folders on one line are peers: neither imports the other.
LAYERS = [
    ("core",),
    ("backbones",),
    ("data", "store"),
    ("heads", "extraction"),
    ("rundir",),
    ("evaluation",),
    ("inspection",),
    ("deploy",),
    ("training",),
    ("report",),
    ("pipeline",),
    ("cli",),
    ("__init__", "__main__"),
    ("dense_head",),   # 0.1.0's import path of a pickled class, kept so old pickles load
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = ("featurepipe",) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The featurepipe modules `path` imports, anywhere in it (`from featurepipe.x import y` counts
    y when y is a module, else x)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules:
                    found.add(full)
                elif base in modules:
                    found.add(base)
    found.discard(name)
    found.discard("featurepipe")  # the package itself: its __init__ is the public API, loaded lazily
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(path, name, set(modules)) for name, path in modules.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(edges.items()):
        layer = layer_of(module)
        if layer not in RANK:
            problems.append(f"{module}: folder {layer!r} is not in LAYERS")
            continue
        for target in sorted(targets):
            other = layer_of(target)
            if other == layer:
                continue
            if other not in RANK:
                problems.append(f"{module} imports {target}: folder {other!r} is not in LAYERS")
            elif RANK[other] > RANK[layer]:
                problems.append(f"{module} imports {target}, a higher layer ({other} above {layer})")
            elif RANK[other] == RANK[layer]:
                problems.append(f"{module} imports {target}, a peer layer ({other} beside {layer})")
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_import_goes_down_a_layer():
    assert upward_imports(graph()) == []


def test_there_are_no_import_cycles():
    assert cycles(graph()) == []


def test_every_folder_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert folders | modules <= set(RANK)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "featurepipe" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "featurepipe"


@pytest.mark.parametrize("where", ["top", "function"])
def test_the_check_catches_an_upward_import(tmp_path, where):
    body = "from featurepipe.evaluation.evaluate import evaluate\n"
    if where == "function":
        body = "def f():\n    " + body
    root = _write(tmp_path, {"__init__.py": "", "core/__init__.py": "", "core/errors.py": body,
                             "evaluation/__init__.py": "", "evaluation/evaluate.py": "def evaluate(): pass\n"})
    problems = upward_imports(graph(root))
    assert problems == ["featurepipe.core.errors imports featurepipe.evaluation.evaluate, a higher layer "
                        "(evaluation above core)"]


def test_the_check_catches_a_peer_import_and_a_cycle(tmp_path):
    root = _write(tmp_path, {"__init__.py": "", "data/__init__.py": "", "store/__init__.py": "",
                             "data/a.py": "from featurepipe.store import b\n",
                             "store/b.py": "from featurepipe.store import c\n",
                             "store/c.py": "def f():\n    from featurepipe.store.b import x\n"})
    edges = graph(root)
    assert upward_imports(edges) == ["featurepipe.data.a imports featurepipe.store.b, a peer layer (store beside data)"]
    assert cycles(edges) == [["featurepipe.store.b", "featurepipe.store.c"]]
