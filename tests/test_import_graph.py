"""Contracts of the module boundaries of lth_tf: no import cycles, entry points are leaves.

The graph is read from the source with `ast` (nothing is imported), counting
every import statement, also those inside functions: a late import hides a
cycle from Python, not from the design.
"""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lth_tf"

# `python -m lth_tf.X` modules: only they read absl FLAGS, and no module of lth_tf imports them.
ENTRY_POINTS = {"imp", "stability", "export", "report", "branch", "branches"}
# What a report needs must not build or train a model.
TRAINING_STACK = {
    "models",
    "rounds",
    "train",
    "sparsity",
    "callbacks",
    "checkpointing",
    "distribute",
    "linear_mode",
    "sparse_export",
}


def _modules() -> dict:
    """{dotted name: path} of every module of lth_tf."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _graph() -> dict:
    """{module: set of lth_tf modules it imports}."""
    modules = _modules()

    def resolve(name):
        # `from lth_tf.a import b`: b is a module when lth_tf.a.b is one, else a name in lth_tf.a.
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module if is_package else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target == "lth_tf" or target.startswith("lth_tf."):
                    found = resolve(target)
                    if found and found != module:
                        edges.add(found)
        graph[module] = edges
    return graph


def _short(module: str) -> str:
    return module.removeprefix("lth_tf.").split(".")[0]


def _reachable(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_sees_known_imports():
    # Guards the parser: a graph with no edges would pass every test below.
    graph = _graph()
    assert "lth_tf.rundir" in graph["lth_tf.rounds"]
    assert "lth_tf.reporting" in graph["lth_tf.report"]
    assert "lth_tf.models.conv" in graph["lth_tf.models"]
    assert "lth_tf.keras" in graph["lth_tf.files"]


def test_lth_tf_has_no_import_cycles():
    graph = _graph()
    cycles = []
    state = {}  # module -> "visiting" | "done"

    def visit(module, stack):
        state[module] = "visiting"
        for nxt in sorted(graph[module]):
            if state.get(nxt) == "visiting":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_entry_points_are_leaves():
    graph = _graph()
    bad = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if _short(target) in ENTRY_POINTS and target.count(".") == 1
    )
    assert not bad, "entry points must be leaves (move the code into a library module): " + str(bad)


def test_reporting_does_not_need_the_training_stack():
    graph = _graph()
    needed = {_short(m) for m in _reachable(graph, "lth_tf.reporting")}
    assert "rundir" in needed and "plots" in needed  # the graph is not empty
    assert not needed & TRAINING_STACK, sorted(needed & TRAINING_STACK)
    assert not needed & ENTRY_POINTS, sorted(needed & ENTRY_POINTS)


def test_each_entry_point_imports_alone():
    # One fresh interpreter per entry point, all at once: each import loads TensorFlow.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", f"import lth_tf.{name}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
            env=env,
        )
        for name in ("imp", "stability", "export", "report", "branch")
    }
    failed = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failed[name] = stderr[-2000:]
    assert not failed, failed
