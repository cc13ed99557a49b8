"""The library's layout as docs/ARCHITECTURE.md draws it: layers, arrows pointing down, small modules."""

import ast
from pathlib import Path

import petseg

PACKAGE = Path(petseg.__file__).parent

# docs/ARCHITECTURE.md's layers, lowest first. A module may import its own layer and those below.
LAYERS = (
    ("foundation", {"errors", "oxford", "storage", "codeversion", "userdirs", "keys", "tokens", "servers", "layout"}),
    ("data", {"archive", "sources", "synth", "scenes", "data", "split", "shards", "pipeline"}),
    ("model", {"architectures", "model", "metrics", "baselines", "determinism", "train", "tune", "calibration",
               "evaluation"}),
    ("release", {"release", "gate", "report", "signing", "provenance"}),
    ("serving", {"messages", "feedback", "quarantine", "serving", "v2_messages", "v2_http"}),
    ("operations", {"deploy_local", "deploy_kubernetes", "kubeconfig", "client", "endpoints", "local_endpoint",
                    "rollout_kubernetes"}),
    ("runs and lineage", {"runs", "lineage", "pachyderm", "pachd_client", "lineage_events", "verify"}),
    ("step glue", {"stages", "hooks"}),
    ("edges", {"cli", "__main__", "commands", "mlserver_runtime", "seldon_launcher", "endpoint_proxy"}),
)
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    """Every module of the package by layer name (commands/* count as ``commands``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.name == "__init__.py" and relative.parent == Path("."):
            continue
        name = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        found[str(relative)] = (name, path)
    return found


def _layer(name: str) -> int:
    """The layer's index; unplaced modules (test_every_module_has_a_layer names them) count as the top."""
    return next((index for index, (_, names) in enumerate(LAYERS) if name in names), len(LAYERS) - 1)


def _petseg_imports(path: Path) -> set[str]:
    """The petseg modules a file imports, at any depth of the file (lazy imports count)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "petseg":
            parts = node.module.split(".")
            if len(parts) > 1:
                imported.add(parts[1])
            else:
                imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[1] for alias in node.names
                            if alias.name.startswith("petseg.") and alias.name.count(".") >= 1)
    return imported - {"__version__"}


def test_every_module_has_a_layer():
    unplaced = sorted(name for name, _ in _modules().values() if not any(name in names for _, names in LAYERS))
    assert not unplaced, f"place these modules in a layer (here and in docs/ARCHITECTURE.md): {unplaced}"


def test_imports_point_down():
    upward = []
    for relative, (name, path) in _modules().items():
        for target in _petseg_imports(path):
            if target != name and _layer(target) > _layer(name):
                upward.append(f"{relative} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = {name: set() for name, _ in _modules().values()}
    for name, path in _modules().values():
        graph[name] |= _petseg_imports(path) - {name}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(step == goal or (step not in seen and reaches(step, goal, seen | {step}))
                   for step in graph.get(start, ()))

    circles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not circles, f"modules on an import circle: {circles}"


def test_modules_are_small_and_say_their_job():
    for relative, (_, path) in _modules().items():
        text = path.read_text(encoding="utf-8")
        assert text.count("\n") <= MAX_LINES, f"{relative} has {text.count(chr(10))} lines (at most {MAX_LINES})"
        assert ast.get_docstring(ast.parse(text)), f"{relative} has no opening docstring naming its job"


def test_library_errors_do_not_need_metaflow():
    assert "metaflow" not in (PACKAGE / "errors.py").read_text(encoding="utf-8")
