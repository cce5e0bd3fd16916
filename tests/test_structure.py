"""The package's structure: no import cycle, the model file stands alone, no module reaches into
another's underscore names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lckv_mini"


def package_imports(path: Path) -> set[str]:
    """The lckv_mini modules a file imports (relative or absolute, at any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                names.add(node.module.split(".")[0])
            elif node.level == 1:
                names.update(a.name for a in node.names)
            elif node.module and node.module.startswith("lckv_mini."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("lckv_mini."))
    return names


def graph() -> dict[str, set[str]]:
    return {p.stem: package_imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"model": {"generate"}, "generate": {"model"}}) == [
        "generate", "model", "generate"]


def test_model_imports_only_the_config_and_the_config_nothing():
    g = graph()
    assert g["model"] == {"config"}
    assert g["config"] == set()
    assert g["data"] == set()


def test_sampling_does_not_need_the_trainer_to_load_a_checkpoint():
    assert "train" not in graph()["checkpoint"]


def test_no_module_uses_another_modules_underscore_names():
    offences = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                offences += [f"{path.name}: imports {a.name}" for a in node.names
                             if a.name.startswith("_")]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name)
                             and node.value.id in ("self", "cls"))):
                offences.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert offences == []


def test_the_sampler_does_not_import_the_trainer():
    assert "train" not in graph()["sample"]
