"""The package's modules import each other without circles, counting imports inside functions too
(a lazy import only hides a circle), so each module can be read, tested and changed on its own."""
import ast
import fnmatch
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "softmoe")


def _modules() -> dict[str, set[str]]:
    """{module: the package modules it imports anywhere in its body} (``from . import x``,
    ``from .x import y``, ``import softmoe.x``; the compiled ``_C`` and the package itself left out)."""
    names = {f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for name in names:
        with open(os.path.join(PACKAGE, name + ".py")) as fh:
            tree = ast.parse(fh.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("softmoe")):
                module = node.module or ""
                module = module.removeprefix("softmoe").lstrip(".") if node.level == 0 else module
                if module:
                    deps.add(module.split(".")[0])
                else:
                    deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("softmoe."))
        graph[name] = (deps & names) - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """A circle of imports as a list of modules, or [] when there is none (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_graph_is_read():
    graph = _modules()
    assert {"experts", "ops"} <= graph["layer"] and "experts" in graph["parallel"], graph


def test_no_import_circle():
    graph = _modules()
    assert _cycle(graph) == [], f"import circle: {' -> '.join(_cycle(graph))}"


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_imports_at_the_top():
    """No module imports in the middle of its code: every module-level import comes before the first
    function or class (imports inside functions are for optional or heavy dependencies)."""
    late = []
    for name in sorted(os.listdir(PACKAGE)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(PACKAGE, name)) as fh:
            body = ast.parse(fh.read()).body
        first_def = next((i for i, node in enumerate(body) if isinstance(node, (ast.FunctionDef, ast.ClassDef))),
                         len(body))
        late += [f"{name}:{node.lineno}" for node in body[first_def:] if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not late, f"module-level imports after the first definition: {late}"


def test_public_op_wrappers_live_in_ops():
    """The wrappers of the compiled ops have one home, softmoe/ops.py, and the package re-exports them."""
    import softmoe
    from softmoe import ops

    for name in ("soft_topk", "dispatch_plan", "gather_rows", "combine_rows", "grouped_mm", "expert_ffn"):
        assert getattr(softmoe, name) is getattr(ops, name) and getattr(ops, name).__module__ == "softmoe.ops", name
    assert ops.matmul.__module__ == "softmoe.ops"


def _python_files():
    for folder in ("softmoe", "tests", "benchmarks", "examples"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            yield from (os.path.join(dirpath, f) for f in files if f.endswith(".py"))
    yield os.path.join(ROOT, "setup.py")


def test_no_sys_path_edits():
    """Nothing edits sys.path: a script imports its own folder's modules (Python puts the script's
    folder first) and the installed package; pytest's pythonpath (pyproject.toml) does it for tests."""
    edits = []
    for path in _python_files():
        with open(path) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                target = next((t.value if isinstance(t, ast.Subscript) else t for t in targets), None)
            if isinstance(target, ast.Attribute) and target.attr == "path" and getattr(target.value, "id", "") == "sys":
                edits.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not edits, f"sys.path edited at {edits}"


def test_bundled_text_ships_with_the_package():
    """softmoe.tiny_lm's default data lies inside the package and is listed as package data, so a
    (non-editable) install has it too."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from softmoe import tiny_lm

    package = os.path.dirname(os.path.abspath(tiny_lm.__file__))
    data = os.path.relpath(tiny_lm.DEFAULT_DATA, package)
    assert os.path.isfile(tiny_lm.DEFAULT_DATA) and not data.startswith(".."), tiny_lm.DEFAULT_DATA
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        globs = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["softmoe"]
    assert any(fnmatch.fnmatch(data, g) for g in globs), (data, globs)
