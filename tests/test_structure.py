"""The package's shape, kept by tests: no import cycles, no import from a lower layer into a higher one
(base -> models -> data -> engine -> commands), no import inside a function except an optional dependency or the
command line's start-up speed, and binary masks vs label maps decided in the task modules, not by branches."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "r2unet"

LAYERS = {"models": 1, "data": 2, "engine": 3, "commands": 4}  # the shared base (errors, fileio, ...) is 0
# imported inside a function on purpose: optional extras, and what a command needs only when it runs (``--help``
# answers without torch)
OPTIONAL = ("onnx", "onnxruntime", "fastapi", "starlette", "uvicorn", "python_multipart", "torch.utils.tensorboard",
            "yaml", "tomllib", "tomli", "matplotlib")
LAZY_BY_DESIGN = {"r2unet.commands.cli", "r2unet"}  # the commands' modules; create_model without torch at import


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import statement of a module."""
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found += [(t, id(node) in in_function, node.lineno) for t in targets]
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 1  # the package itself builds models (create_model)
    return 4 if parts[1] == "__main__" else LAYERS.get(parts[1], 0)


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, {m: _imports(m, p, modules) for m, p in modules.items()}


def test_no_import_cycles(graph):
    modules, imports = graph
    edges = {m: {t for t, _, _ in found if t in modules and t != m} for m, found in imports.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [])


def test_no_import_reaches_up_a_layer(graph):
    modules, imports = graph
    upward = [f"{m} imports {t} (line {line})" for m, found in imports.items() for t, _, line in found
              if t.startswith("r2unet") and t in modules and _layer(t) > _layer(m)]
    assert not upward, upward


def test_imports_inside_functions_are_only_optional_or_start_up_speed(graph):
    _, imports = graph
    hidden = [f"{m}:{line} imports {t}" for m, found in imports.items() for t, inside, line in found
              if inside and not t.startswith(OPTIONAL) and m not in LAZY_BY_DESIGN]
    assert not hidden, hidden


def test_binary_and_label_maps_are_told_apart_in_the_task_modules():
    """Branches on the class count outside ``engine/task.py`` and ``data/targets.py``: each must say why."""
    pattern = re.compile(r"(num_classes|classes)\s*(<=|>=|<|>|==|!=)\s*[0-9]|shape\[1\]\s*(<=|>=|<|>|==|!=)\s*1")
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("task.py", "targets.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]) and not line.strip().startswith(("#", '"', "'")):
                found.append((f"{path.relative_to(PACKAGE)}:{number}", line.strip(), "#" in line))
    assert len(found) <= 3, found
    assert all(commented for _, _, commented in found), [f for f in found if not f[2]]


def test_each_default_is_stated_once():
    """The defaults of the settings live in ``r2unet/defaults.py``; a literal of one elsewhere restates it (the
    networks' names are declared in ``models/spec.py``)."""
    restated = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("defaults.py", "spec.py"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        restated += [f"{path.relative_to(PACKAGE)}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
                     if isinstance(n, ast.Constant) and id(n) not in docstrings and n.value in (224, "R2U_Net")]
    assert not restated, restated
