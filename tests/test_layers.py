"""The package's layers (the docstring of diffusion_jax/__init__.py): no import circles among
its modules, lazy imports inside functions included, and no import of a higher layer."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "diffusion_jax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first; a module is in the layer of its longest matching prefix. A module may import
# its own layer and the layers below it.
LAYERS = {
    "diffusion_jax": 0,  # the package's __init__: a docstring and the version
    "diffusion_jax.diffusion": 1,
    "diffusion_jax.errors": 2,
    "diffusion_jax.paths": 2,
    "diffusion_jax.config": 2,
    "diffusion_jax.validation": 2,
    "diffusion_jax.recipes": 2,
    "diffusion_jax.parallel": 3,
    "diffusion_jax.checkpointing": 3,
    "diffusion_jax.export": 3,
    "diffusion_jax.metrics_io": 3,
    "diffusion_jax.models": 4,
    "diffusion_jax.data": 4,
    "diffusion_jax.objectives": 4.5,
    "diffusion_jax.training": 4.5,
    "diffusion_jax.training.state": 4.5,
    "diffusion_jax.training.step": 4.5,
    "diffusion_jax.generation": 5,
    "diffusion_jax.weights": 5,
    "diffusion_jax.run": 6,
    "diffusion_jax.evaluation": 7,
    "diffusion_jax.jobs": 8,
    "diffusion_jax.tools": 8,
    "diffusion_jax.preflight": 8,
    "diffusion_jax.main": 9,
    "diffusion_jax.cli_args": 9,
    "diffusion_jax.__main__": 10,
}

# (importer prefix, imported prefix, why): imports the layer numbers alone would allow.
FORBIDDEN = [
    ("diffusion_jax.evaluation", "diffusion_jax.training", "evaluation never imports training/"),
    ("diffusion_jax.data", "diffusion_jax.models", "the data side knows no model"),
    ("diffusion_jax.models", "diffusion_jax.data", "models know no data pipeline"),
    ("diffusion_jax", "diffusion_jax.tools", "command-line programs are imported by no one"),
]


def module_names(root: Path = ROOT) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules) -> dict[str, int]:
    """{imported package module: line} of every import statement in the file, at any depth
    (lazy imports inside functions count)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import name` imports the module pkg.name when there is one.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module c
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def room_of(name: str) -> str:
    """The room of a module: the top-level module or sub-package it belongs to."""
    return ".".join(name.split(".")[:2])


def room_graph(graph: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """{room: {room it imports: a line}}: the module graph with each room as one node, so
    that two rooms importing each other (through different modules) form a circle."""
    rooms: dict[str, dict[str, int]] = {}
    for name, targets in graph.items():
        own = rooms.setdefault(room_of(name), {})
        for target, line in targets.items():
            if room_of(target) != room_of(name) and room_of(target) != PACKAGE:
                own.setdefault(room_of(target), line)
    return rooms


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str) -> float | None:
    """The layer of the longest listed prefix of `name`; the package itself only by name."""
    if name == PACKAGE:
        return LAYERS[PACKAGE]
    matches = [p for p in LAYERS if p != PACKAGE and _matches(name, p)]
    return LAYERS[max(matches, key=len)] if matches else None


def layer_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    """One line per import that breaks the layer rules, naming the module, line and import."""
    problems = []
    for name, targets in sorted(graph.items()):
        own = layer_of(name)
        if own is None:
            problems.append(f"{name}: in no layer; add it to LAYERS and the package docstring")
            continue
        for target, line in sorted(targets.items()):
            where = f"{name} (line {line}) imports {target}"
            other = layer_of(target)
            if other is not None and other > own:
                problems.append(f"{where}: layer {other} is above its own layer {own}")
            for importer, imported, why in FORBIDDEN:
                if (
                    _matches(name, importer)
                    and _matches(target, imported)
                    and not _matches(name, imported)
                ):
                    problems.append(f"{where}: {why}")
            if _matches(target, "diffusion_jax.main") and name != "diffusion_jax.__main__":
                problems.append(f"{where}: nothing imports the command line")
    return problems


def test_the_package_has_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_two_rooms_import_each_other():
    """A room (top-level module or sub-package) is read as one place: no circle between
    rooms, even when the modules inside them import without one."""
    cycle = find_cycle(room_graph(import_graph()))
    assert cycle is None, "circle between rooms: " + " -> ".join(cycle)


def test_every_import_keeps_to_the_layers():
    problems = layer_violations(import_graph())
    assert not problems, "\n".join(problems)


def test_the_layers_are_written_in_the_package_docstring():
    import diffusion_jax

    doc = diffusion_jax.__doc__
    modules = module_names()
    for prefix in LAYERS:
        if prefix != PACKAGE:
            path = prefix.removeprefix(PACKAGE + ".").replace(".", "/")
            is_package = modules[prefix].name == "__init__.py"
            named = f"`{path}/`" if is_package else f"`{path}.py`"
            assert named in doc, f"{named} is not described in diffusion_jax/__init__.py"


def test_the_checks_find_a_circle_and_a_layer_break(tmp_path):
    """The three checks on a small package that has one of each, lazy import included."""
    pkg = tmp_path / PACKAGE
    (pkg / "evaluation").mkdir(parents=True)
    (pkg / "training").mkdir()
    for init in (pkg, pkg / "evaluation", pkg / "training"):
        (init / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def f():\n    from diffusion_jax import parallel\n")
    (pkg / "parallel.py").write_text("from diffusion_jax.config import f\n")
    (pkg / "jobs").mkdir()
    (pkg / "jobs" / "__init__.py").write_text("")
    (pkg / "evaluation" / "evaluate.py").write_text("from ..training import step\n")
    (pkg / "training" / "step.py").write_text("from diffusion_jax.evaluation import metrics\n")
    (pkg / "evaluation" / "metrics.py").write_text("")
    (pkg / "jobs" / "train.py").write_text("import diffusion_jax.generation\n")
    (pkg / "generation.py").write_text("")
    (pkg / "unlisted.py").write_text("")
    graph = import_graph(pkg)
    assert find_cycle(graph) == [
        "diffusion_jax.config",
        "diffusion_jax.parallel",
        "diffusion_jax.config",
    ]
    problems = layer_violations(graph)
    assert any(
        "diffusion_jax.config (line 2) imports diffusion_jax.parallel: layer 3" in p
        for p in problems
    )
    assert any("evaluation never imports training/" in p for p in problems)
    assert "diffusion_jax.unlisted: in no layer; add it to LAYERS and the package docstring" in (
        problems
    )
    # The training job (layer 8) may import generation (layer 5).
    assert not any(p.startswith("diffusion_jax.jobs.train") for p in problems)
    # evaluate -> training.step -> evaluation.metrics: no module circle, but a room circle.
    graph_without_config = {
        n: t for n, t in graph.items() if "config" not in n and "parallel" not in n
    }
    rooms = room_graph(graph_without_config)
    assert find_cycle(graph_without_config) is None
    assert find_cycle(rooms) == [
        "diffusion_jax.evaluation",
        "diffusion_jax.training",
        "diffusion_jax.evaluation",
    ]
