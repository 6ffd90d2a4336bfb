"""The layout the architecture keeps (issue 17), read from the source: files of one job (at most
500 lines), a small top level in progvlm/, no import cycle (imports inside functions included),
and a core (codec, network, serving) that never imports the toy world, evaluation, the bench or
the command line."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("progvlm/**/*.py"), *ROOT.glob("edge_agent/**/*.py"), *ROOT.glob("app*.py")])
CORE = ("progvlm.codec", "progvlm.net", "progvlm.serve", "progvlm.video")
NOT_FOR_THE_CORE = ("progvlm.toyworld", "progvlm.eval", "progvlm.bench", "progvlm.cli")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SOURCES}


def imports(path: Path, lazy: bool = True) -> set[str]:
    """The project modules `path` imports (at its top level only, unless `lazy`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if lazy else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" for a in node.names] + [source]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_source_file_holds_two_jobs():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_the_top_level_of_progvlm_is_small():
    top = sorted(p.name for p in (ROOT / "progvlm").glob("*.py")
                 if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= 6, top


def test_no_import_cycle_even_through_imports_inside_functions():
    graph = {name: imports(path) for name, path in MODULES.items()}
    # a package's __init__ re-exporting its own modules is no cycle of work: leave the package
    # → own-submodule edges out, keep everything else
    edges = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("core", CORE)
def test_the_core_never_imports_the_toy_world_evaluation_bench_or_cli(core):
    core_modules = [n for n in MODULES if n == core or n.startswith(core + ".")]
    assert core_modules
    for name in core_modules:  # directly, lazily or not
        bad = [t for t in imports(MODULES[name]) if t.startswith(NOT_FOR_THE_CORE)]
        assert not bad, f"{name} imports {bad}"
    seen, todo = set(), list(core_modules)  # nor through what it imports when it loads
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += imports(MODULES[name], lazy=False)
    reached = sorted(n for n in seen if n.startswith(NOT_FOR_THE_CORE))
    assert not reached, f"importing {core} loads {reached}"


# what a board imports without PyTorch installed (the `[edge]` and `[edge-litert]` extras)
EDGE_WITHOUT_TORCH = ("edge_agent.agent", "edge_agent.service", "edge_agent.watch",
                      "edge_agent.watch_service", "edge_agent.onnx_runtime",
                      "edge_agent.litert_runtime", "edge_agent.__main__")


def test_the_edge_imports_without_torch():
    """The slow install tests build a torch-free venv; this catches a module-level `import torch`
    on the edge's path in the fast suite (torch made unimportable in a child interpreter)."""
    import subprocess
    import sys
    code = ("import builtins\nreal = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'):\n"
            "        raise ModuleNotFoundError(\"No module named 'torch'\")\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import importlib, sys\n"
            f"for m in {EDGE_WITHOUT_TORCH!r}:\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except ModuleNotFoundError as e:\n"
            "        if 'onnxruntime' in str(e) or 'ai_edge_litert' in str(e):\n            continue\n"
            "        raise\n"
            "assert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
