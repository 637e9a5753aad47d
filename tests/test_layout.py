"""The package's layout stays as built: imports run one way along the path of a request (front ends -> engine ->
inputs -> model -> parallel -> kernels -> base), no module imports another that imports it back (function-level
imports included), and no function grows past 80 lines. Walked with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "glm45v_npu"
NAME = PACKAGE.name

# rooms, lowest first: a module may import its own room or any room below it, never one above or beside it
ROOMS = [
    ("base", {"errors", "platform", "outputs", "apart", "sampling_params"}),
    ("testing", {"testing"}),
    ("kernels", {"kernels"}),
    ("parallel", {"parallel"}),
    ("model", {"model"}),
    ("inputs", {"inputs"}),
    ("engine", {"engine"}),
    ("api", {"llm"}),
    ("apps", {"apps"}),
    ("server", {"server"}),
    ("cli", {"cli", "__main__", "__init__"}),
]
BESIDE = {("server", "apps"), ("apps", "server")}  # same height, and neither may import the other
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    for name, members in ROOMS:
        if head in members:
            return name
    raise AssertionError(f"{module}: in no room of the layout; add it to ROOMS in {Path(__file__).name}")


def rank(module: str) -> int:
    return [name for name, _ in ROOMS].index(room(module))


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(source: str, me: str, is_package: bool, known: set[str]) -> set[str]:
    """Every package module that module `me` (whose text is `source`) imports, wherever the statement stands."""
    package = me if is_package else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[: len(base) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == NAME or t.startswith(NAME + "."))
    found.discard(me)
    return {t for t in found if t in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p.read_text(), m, p.name == "__init__.py", set(mods)) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_room():
    for m in modules():
        room(m)


def test_no_import_circles():
    assert cycles(graph()) == []


def against_the_direction(g: dict[str, set[str]]) -> list[str]:
    wrong = []
    for m, targets in sorted(g.items()):
        for t in sorted(targets):
            a, b = room(m), room(t)
            if a != b and (rank(t) > rank(m) or (a, b) in BESIDE):
                wrong.append(f"{m} ({a}) imports {t} ({b})")
    return wrong


def test_imports_run_one_way():
    wrong = against_the_direction(graph())
    assert wrong == [], "\n".join(wrong)


def test_no_function_over_80_lines():
    long = []
    for m, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert long == [], "\n".join(long)


def test_the_check_sees_what_it_must_refuse():
    """The walker itself: a function-level relative import is seen and named as against the direction, an import
    of a sibling module through its package is resolved to it, and a circle is found."""
    known = set(modules())
    probe = "import os\n\n\ndef f():\n    from ..engine import engine\n    from . import ops\n"
    found = imports(probe, f"{NAME}.kernels.probe", False, known)
    assert found == {f"{NAME}.engine.engine", f"{NAME}.kernels.ops"}
    assert against_the_direction({f"{NAME}.kernels.probe": found}) == [
        f"{NAME}.kernels.probe (kernels) imports {NAME}.engine.engine (engine)"]
    assert against_the_direction({f"{NAME}.apps.x": {f"{NAME}.server.app"}}) != []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
