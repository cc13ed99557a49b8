"""The library's layout as docs/ARCHITECTURE.md draws it: packages by layer, arrows pointing down, small modules."""

import ast
from pathlib import Path

import petseg

PACKAGE = Path(petseg.__file__).parent

# docs/ARCHITECTURE.md's layers, lowest first: the foundation is the package's own top-level modules, every
# other layer a sub-package. A module may import its own layer and those below.
LAYERS = ({"foundation"}, {"data"}, {"model"}, {"release"}, {"serving"}, {"deploy"}, {"lineage"}, {"flow"},
          {"cli", "entrypoints"})
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Every module by dotted name under petseg (``data.shards``, ``errors``), package ``__init__`` included."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts)] = path
    return found


def _package(module: str) -> str:
    """The layer package of a module: its sub-package, or ``foundation`` for a top-level module."""
    first = module.split(".")[0]
    if first == "__main__":  # `python -m petseg`: the command line
        return "cli"
    return first if (PACKAGE / first).is_dir() else "foundation"


def _layer(module: str) -> int:
    return next(index for index, packages in enumerate(LAYERS) if _package(module) in packages)


def _imports(path: Path) -> set[str]:
    """The petseg modules a file imports, at any depth of the file (lazy imports count)."""
    modules, imported = _modules(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "petseg":
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            dotted = name.removeprefix("petseg.")
            # `from petseg.data import shards` names a module; `from petseg.data.shards import encode` its module
            while dotted and dotted not in modules:
                dotted = dotted.rpartition(".")[0]
            if dotted and name.startswith("petseg."):
                imported.add(dotted)
    return imported


def test_every_package_is_a_layer():
    packages = {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    unplaced = sorted(packages - set().union(*LAYERS))
    assert not unplaced, f"place these packages in a layer (here and in docs/ARCHITECTURE.md): {unplaced}"
    loose = sorted(path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"
                   and not (path / "__init__.py").exists())
    assert not loose, f"folders without __init__.py: {loose}"


def test_imports_point_down():
    upward = []
    for module, path in _modules().items():
        for target in _imports(path):
            if _layer(target) > _layer(module):
                upward.append(f"{module} ({_package(module)}) imports {target} ({_package(target)})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = {module: _imports(path) - {module} for module, path in _modules().items()}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(step == goal or (step not in seen and reaches(step, goal, seen | {step}))
                   for step in graph.get(start, ()))

    circles = sorted(module for module in graph if reaches(module, module, {module}))
    assert not circles, f"modules on an import circle: {circles}"


def test_modules_are_small_and_say_their_job():
    for module, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        assert text.count("\n") <= MAX_LINES, f"{module} has {text.count(chr(10))} lines (at most {MAX_LINES})"
        assert ast.get_docstring(ast.parse(text)), f"{module} has no opening docstring naming its job"


def test_library_errors_do_not_need_metaflow():
    assert "metaflow" not in (PACKAGE / "errors.py").read_text(encoding="utf-8")


def test_the_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checks above are not vacuous: an upward import in a data module is found."""
    fake = tmp_path / "data" / "fake.py"
    fake.parent.mkdir()
    fake.write_text('"""x"""\nfrom petseg.flow import stages\n')
    assert "flow.stages" in _imports(fake)
    assert _layer("flow.stages") > _layer("data.shards")
