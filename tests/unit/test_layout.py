"""The engine's layout: imports run one way, with no circle, and components stay independent.

Every `import` and `from ... import` in platform/ and components/ counts, at module level and inside
functions alike (an import inside a function is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Bottom to top. A package may import its own modules and any package of a lower layer; packages of
# the same layer are independent of each other. evaluate/ and tracking/ are fed by the run: they
# never reach into the loader, the trainer or Ray.
LAYERS = [
    {"errors"},
    {"host", "torchfile"},
    {"data", "tracking", "evaluate"},
    {"config"},
    {"train"},
    {"jobs"},
    {"scale"},
    {"cli"},
]
FORBIDDEN_IN_COMPONENTS = ("gin", "ray", "mlflow", "selfflow.platform")


def module_name(path: Path, root: str, package: str) -> str:
    relative = path.relative_to(REPO_ROOT / root).with_suffix("")
    parts = [part for part in relative.parts if part != "__init__"]
    return ".".join([package, *parts])


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def engine_graph() -> dict[str, set[str]]:
    modules = {module_name(path, "platform", "selfflow.platform"): path
               for path in (REPO_ROOT / "platform").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path):
            # `from selfflow.platform.train import checkpoint` names a module; keep the longest known prefix
            candidates = [m for m in modules if imported == m or imported.startswith(m + ".")]
            if candidates:
                targets.add(max(candidates, key=len))
        graph[name] = targets - {name}
    return graph


def package_of(module: str) -> str:
    return module.split(".")[2]


def layer_of(package: str) -> int:
    for index, layer in enumerate(LAYERS):
        if package in layer:
            return index
    raise AssertionError(f"package {package!r} is in no layer of tests/unit/test_layout.py: add it")


def test_engine_imports_have_no_circle():
    graph = engine_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_engine_imports_run_one_way():
    wrong = []
    for module, targets in engine_graph().items():
        package = package_of(module)
        for target in targets:
            other = package_of(target)
            if other == package:
                continue
            if layer_of(other) >= layer_of(package):
                wrong.append(f"{module} imports {target} ({other} is not below {package})")
    assert not wrong, "\n".join(sorted(wrong))


def test_components_import_neither_gin_ray_mlflow_nor_the_platform():
    wrong = []
    for path in (REPO_ROOT / "components").rglob("*.py"):
        for imported in imports_of(path):
            if any(imported == name or imported.startswith(name + ".") for name in FORBIDDEN_IN_COMPONENTS):
                wrong.append(f"{path.relative_to(REPO_ROOT)} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_benchmarks_are_not_part_of_the_installed_package():
    assert not list((REPO_ROOT / "platform").rglob("bench*.py"))
    assert not list((REPO_ROOT / "components").rglob("bench*.py"))


def test_the_layout_test_sees_function_level_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from selfflow.platform.train import driver\n")
    assert "selfflow.platform.train.driver" in imports_of(sample)
