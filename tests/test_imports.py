"""The package's modules import each other without circles, counting imports inside functions too
(a lazy import only hides a circle), so each module can be read, tested and changed on its own."""
import ast
import os

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
