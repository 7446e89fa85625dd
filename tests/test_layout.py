"""The layering rules of docs/architecture.md, read from the source with `ast` (no imports run)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("models", "diffusion", "preparation", "evaluations", "fcdm_common")
PROGRAMS = ("train_gen", "benchmarks")
PACKAGES = LIBRARIES + PROGRAMS


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports(path: Path):
    """(imported module, names, node, inside a function) for every first-party import of a file."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    me = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = me.split(".")[:len(me.split(".")) - node.level + (path.name == "__init__.py")]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found = [(target, [a.name for a in node.names])]
        else:
            continue
        for target, names in found:
            if target.split(".")[0] in PACKAGES:
                yield target, names, node, id(node) in inner


def test_libraries_never_import_programs_and_fcdm_common_imports_nothing_of_ours():
    bad = []
    for name, path in modules().items():
        top = name.split(".")[0]
        for target, _, node, _ in imports(path):
            other = target.split(".")[0]
            if (top in LIBRARIES and other in PROGRAMS) or (top == "fcdm_common" and other != "fcdm_common"):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for target, names, _, inner in imports(path):
            if inner:
                continue  # deferred imports run after every module has loaded
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in mods and cand != name:
                    deps.add(cand)
                    break
        graph[name] = deps
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_inside_functions_say_why_and_no_private_names_cross_modules(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    near = " ".join(lines[max(0, node.lineno - 3):node.end_lineno])
                    if "deferred" not in near:
                        bad.append(f"{path.relative_to(REPO)}:{node.lineno}: import inside a function without a "
                                   "'deferred: why' comment")
        for target, names, node, _ in imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module_name(path):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: imports private {private} from {target}")
    assert not bad, "\n".join(bad)
