"""The package's structure: no import cycle, the model file stands alone, no module reaches into
another's underscore names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lckv_mini"


def module_name(path: Path) -> str:
    """A file's module inside the package: "model", "bench.common", "bench" (its __init__)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> set[str]:
    """The lckv_mini modules a file imports (relative or absolute, at any depth), named as
    module_name names them."""
    name = module_name(path).split(".")
    package = name if path.name == "__init__.py" else name[:-1]  # the package the file is in
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                if node.module:
                    names.add(".".join(base + node.module.split(".")))
                else:  # from . import x, y: modules of that package
                    names.update(".".join(base + [a.name]) for a in node.names)
            elif node.module and node.module.startswith("lckv_mini."):
                names.add(node.module.split(".", 1)[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".", 1)[1] for a in node.names
                         if a.name.startswith("lckv_mini."))
    return names


def modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"]


def graph() -> dict[str, set[str]]:
    return {module_name(p): package_imports(p) for p in modules()}


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


# Underscore names that a library documents as its API: torch's dynamic-shapes guide marks a
# dimension dynamic with torch._dynamo.mark_dynamic (torch.compiler has no public twin in 2.13).
DOCUMENTED = {"torch._dynamo.mark_dynamic"}


def dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def test_no_module_uses_another_modules_underscore_names():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        allowed = {id(n.value) for n in ast.walk(tree)
                   if isinstance(n, ast.Attribute) and dotted(n) in DOCUMENTED}
        for node in ast.walk(tree):
            if id(node) in allowed:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                offences += [f"{path.name}: imports {a.name}" for a in node.names
                             if a.name.startswith("_")]
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                modules = ([node.module] if isinstance(node, ast.ImportFrom)
                           else [a.name for a in node.names])
                offences += [f"{path.name}:{node.lineno}: imports {m}" for m in modules
                             if any(p.startswith("_") and not p.startswith("__")
                                    for p in m.split("."))]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name)
                             and node.value.id in ("self", "cls"))):
                offences.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert offences == []


def test_the_graph_sees_inside_the_bench_package():
    g = graph()
    assert {"model", "generate", "bench.common"} <= g["bench.correctness"]
    assert "bench.correctness" in g["bench.gpu_check"] and "bench.cli" in g["bench"]


def test_the_sampler_does_not_import_the_trainer():
    assert "train" not in graph()["sample"]
