"""The package's shape: imports run one way, top to bottom (docs/architecture.md), with no cycle.

Read statically from the source, function-level imports included, so that a lazy import cannot hide
a cycle or an upward dependency.
"""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "pvq"

# Each module's layer, bottom (0) to top; a module may import modules of its own layer or below.
# The pure math (codec, transforms, solvers) imports nothing above it and no model code.
LAYERS = [
    ("codec", "transforms", "solvers"),
    ("runtime",),
    ("settings", "memory", "data", "models", "errors", "resume", "tensorfile", "offload"),
    ("picker",),
    ("modules",),
    ("checkpoint", "eval", "measure", "finetune"),
    ("loader", "api", "allocation"),
    ("hf", "distributed"),
    ("cli", "__init__"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# inside the math layer, which package may use which
MATH = {"codec": {"codec"}, "transforms": {"transforms"}, "solvers": {"solvers", "codec"}}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _package_of(module: str) -> str:
    return module.split(".")[0]


def _imports(path: Path) -> set[str]:
    """pvq modules imported anywhere in the file (relative imports resolved), as dotted names under pvq."""
    me = _module_name(path)
    is_pkg = path.name == "__init__.py"
    base = me.split(".") if is_pkg or me == "__init__" else me.split(".")[:-1]
    if me == "__init__":
        base = []
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                up = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*up, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "pvq" or node.module.startswith("pvq.")):
                target = node.module[4:]
            else:
                continue
            names = [a.name for a in node.names]
            # `from . import x` / `from .pkg import mod`: the names may be modules themselves
            for n in names:
                cand = f"{target}.{n}" if target else n
                if (SRC / cand.replace(".", "/")).with_suffix(".py").is_file() or (SRC / cand.replace(".", "/")).is_dir():
                    out.add(cand)
                elif target:
                    out.add(target)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pvq."):
                    out.add(a.name[4:])
    out.discard(me)
    return {m for m in out if m}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def test_every_module_has_a_layer():
    missing = sorted({_package_of(m) for m in _graph()} - set(RANK))
    assert not missing, f"modules with no layer in LAYERS (add them, and to docs/architecture.md): {missing}"


def test_imports_only_go_down():
    bad = []
    for mod, deps in _graph().items():
        pkg = _package_of(mod)
        for dep in deps:
            dpkg = _package_of(dep)
            if RANK[dpkg] > RANK[pkg]:
                bad.append(f"{mod} -> {dep}")
            elif RANK[pkg] == 0 and dpkg not in MATH[pkg]:
                bad.append(f"{mod} -> {dep} (the math layer keeps to itself)")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            # a package's __init__ importing its own submodules is how a package re-exports them
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if state.get(d) is None and d in graph:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_function_level_and_relative_imports():
    """The graph is only worth something if it sees lazy imports: check on a known file."""
    deps = _imports(SRC / "cli.py")
    assert {"loader", "api", "checkpoint"} <= deps  # all imported inside command functions
    assert "codec.pyramid" in _imports(SRC / "runtime" / "limits.py")
