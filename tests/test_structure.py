"""The package's shape: no import circles, and the prediction runtime free of torch."""

import ast
import subprocess
import sys
from pathlib import Path

import imgcls

PACKAGE = Path(imgcls.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = PACKAGE.parent.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at module level or inside functions alike."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("imgcls"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not source.startswith("imgcls"):
                    continue
                for alias in node.names:  # `from . import rundir` imports the module rundir
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if _is_module(sub) else source)
        targets.discard(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "imgcls.rundir" in graph["imgcls.train.prepare"]           # `from .. import rundir`
    assert "imgcls.train.features" in graph["imgcls.train.strategies"]  # inside a function


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_cli_parser_and_onnx_prediction_modules_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import imgcls.cli, imgcls.prediction.predict, imgcls.train.config\n"
            "imgcls.cli.build_parser().parse_args(['train', 'd', '--out', 'o', '--lr', '0.1'])\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# The package read from the bottom up is the pipeline: the ground everyone uses, data, the run directory,
# evaluation, the task table, models, prediction, export, training, serving and the API over them.
LAYERS = ["errors", "system", "progress", "softmax", "data", "rundir", "evaluation", "tasks", "models", "prediction",
          "export", "train", "serve", "api", "demo", "cli", "__main__"]


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_each_part_imports_only_the_parts_below_it():
    graph = import_graph()
    assert {_part(m) for m in graph} - {"imgcls"} == set(LAYERS)  # a new part needs its place in LAYERS
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if _part(a) != _part(b) and "imgcls" not in (_part(a), _part(b))  # the root: __version__
                    and LAYERS.index(_part(b)) > LAYERS.index(_part(a)))
    assert not upward, upward


def test_the_evaluation_modules_import_without_torch():
    names = sorted(f"imgcls.evaluation.{p.stem}" for p in (PACKAGE / "evaluation").glob("*.py") if p.stem != "__init__")
    assert len(names) >= 7
    code = f"import sys; sys.modules['torch'] = None\nimport {', '.join(names)}\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
