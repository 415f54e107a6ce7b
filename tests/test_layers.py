"""The import graph: project modules import each other at the top of a file and only downward
(docs/architecture.md §1); a function-level import is allowed only with a comment saying why."""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PROJECT = ("cope_jax", "data_pipeline", "configs")

# Lower numbers are lower layers; a module may import its own layer or lower ones.
LAYERS = [
    ("cope_jax", 0), ("cope_jax.errors", 0),
    ("cope_jax.sharding", 1), ("cope_jax.weights", 1), ("cope_jax.accelerators", 1),
    ("cope_jax.models", 2), ("data_pipeline", 2),
    ("cope_jax.distributed", 3), ("cope_jax.checkpoints", 3),
    ("cope_jax.video", 4),
    ("cope_jax.training", 5), ("cope_jax.inference", 5),
    ("cope_jax.evaluation", 6), ("cope_jax.serving", 6), ("cope_jax.compile", 6),
    ("cope_jax.main", 7), ("cope_jax.chat", 7), ("cope_jax.convert", 7), ("cope_jax.evaluate", 7),
    ("cope_jax.serve", 7), ("configs", 7),
]
# Same layer, still never: training and inference are siblings that share `video`, not each other.
FORBIDDEN = {("cope_jax.training", "cope_jax.inference"), ("cope_jax.inference", "cope_jax.training")}


def layer_of(module: str) -> tuple[str, int]:
    matches = [(prefix, rank) for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module}: not in LAYERS (add it to the layer it belongs to)"
    return max(matches, key=lambda m: len(m[0]))


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(tree: ast.Module):
    """(imported module, line, inside a function) for every import of a project module."""
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports pkg.sub when sub is a module, else a name of pkg
            names = [f"{node.module}.{alias.name}" if _is_module(f"{node.module}.{alias.name}") else node.module
                     for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PROJECT:
                yield name, node.lineno, id(node) in nested


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _reason_given(lines: list[str], at: int) -> bool:
    """A comment on the import, on another import of its block, or on the line above the block."""
    start = at
    while start > 0 and lines[start - 1].strip().startswith(("from ", "import ")):
        start -= 1
    end = at
    while end + 1 < len(lines) and lines[end + 1].strip().startswith(("from ", "import ")):
        end += 1
    return any("#" in line for line in lines[max(start - 1, 0): end + 1])


def sources():
    for top in PROJECT:
        for path in sorted((REPO / top).rglob("*.py")):
            yield path


def test_imports_only_go_down_the_layers():
    problems = []
    for path in sources():
        importer = module_name(path)
        home, rank = layer_of(importer)
        for imported, line, _ in project_imports(ast.parse(path.read_text())):
            target, target_rank = layer_of(imported)
            if target_rank > rank or (home, target) in FORBIDDEN:
                problems.append(f"{path.relative_to(REPO)}:{line}: {importer} imports {imported}")
    assert not problems, "imports that go up or sideways:\n" + "\n".join(problems)


def test_function_level_imports_say_why():
    problems = []
    for path in sources():
        lines = path.read_text().splitlines()
        for imported, line, in_function in project_imports(ast.parse("\n".join(lines))):
            if in_function and not _reason_given(lines, line - 1):
                problems.append(f"{path.relative_to(REPO)}:{line}: imports {imported} inside a function without a reason")
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer_and_every_layer_a_module():
    for path in sources():
        layer_of(module_name(path))
    assert not [prefix for prefix, _ in LAYERS if not _is_module(prefix)]
