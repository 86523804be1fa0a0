"""The package's shape, as a maintainer feels it (not a test): modules per folder, the largest modules,
the longest functions, import cycles (imports inside functions included), the widest signatures and
the user-facing bare ValueErrors. Reads source only (AST), so it runs on any checkout:

    python benchmarks/code_shape.py                     # this checkout
    python benchmarks/code_shape.py --rev 60c9797       # another commit, read with `git show`
"""

from __future__ import annotations

import argparse
import ast
import collections
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.test_layering import cycles  # noqa: E402  (the layering test's own Tarjan)


def sources(rev: str | None) -> dict[str, str]:
    """module file path (relative to the repo) -> its text, at `rev` or in the working tree."""
    if rev is None:
        return {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "featurepipe").rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "featurepipe"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout for n in names if n.endswith(".py")}


def module_name(path: str) -> str:
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(files: dict[str, str]) -> dict[str, set[str]]:
    modules = {module_name(p) for p in files}
    edges = {}
    for path, text in files.items():
        name, found = module_name(path), set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
        edges[name] = {m for m in found if m in modules and m not in (name, "featurepipe")}
    return edges


def shape(files: dict[str, str]) -> dict:
    per_folder = collections.Counter(str(Path(p).parent) for p in files)
    lines = {p: len(t.splitlines()) for p, t in files.items()}
    functions, signatures, bare = [], [], 0
    for path, text in files.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path}:{node.name}"))
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                n -= 1 if a.args and a.args[0].arg in ("self", "cls") else 0
                signatures.append((n, f"{path}:{node.name}"))
            elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                    and getattr(node.exc.func, "id", None) == "ValueError":
                bare += 1
    return {"modules": len(files), "per_folder": dict(sorted(per_folder.items())),
            "largest": sorted(((n, p) for p, n in lines.items()), reverse=True)[:5],
            "over_500": sum(n > 500 for n in lines.values()),
            "longest_functions": sorted(functions, reverse=True)[:5],
            "widest_signatures": sorted(signatures, reverse=True)[:5],
            # A typer command takes one parameter per option; the library's stages are what callers write.
            "widest_library_signatures": sorted((s for s in signatures if "/cli" not in s[1] and "cli.py" not in s[1]),
                                                reverse=True)[:5],
            "cycles": cycles(import_graph(files)), "raise_ValueError": bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="a git revision (default: the working tree)")
    result = shape(sources(parser.parse_args().rev))
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"    {k}: {v}")
        elif isinstance(value, list):
            print(f"{key}:")
            for item in value:
                print(f"    {item}")
        else:
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
