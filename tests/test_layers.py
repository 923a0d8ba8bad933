"""The floor plan of docs/ARCHITECTURE.md, enforced: no layer imports a layer above it, no ground package imports
another, and `ldm.*` imports sit at module level (function-local imports are for heavy optional packages only)."""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Higher numbers sit higher. Same-rank packages may import each other only where ALLOWED_SIDEWAYS says so.
RANKS = {
    "cli": 5, "bench": 5,
    "pipeline": 4, "train": 4,
    "io": 3,
    "models": 2,
    "diffusion": 1, "eval": 1, "data": 1,
    "config": 0, "errors": 0, "atomic": 0, "runtime": 0, "textfiles": 0, "writable": 0, "imagemodes": 0,
}
ALLOWED_SIDEWAYS = {("train", "pipeline")}  # training previews use the one sampling function of the pipeline
# ldm modules that import a heavy optional package at their top, so that importing them costs what it does: they are
# imported function-locally where they run, as the package itself would be (and only by the module named)
OPTIONAL_MODULES = {
    "ldm.models.group_norm_kernel": ("triton", "ldm/models/fused_group_norm.py"),  # ~1 s: triton and its op
}


def _ldm_imports(tree: ast.AST):
    """(module name, line, is_function_local) for every `ldm.*` import in a module."""
    local_nodes = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local_nodes.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and node.args[0].value.split(".")[0] == "ldm"):
            yield node.args[0].value, node.lineno, True  # a dynamic import is a hidden function-local one
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ldm":
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "ldm"]
        for name in names:
            yield name, node.lineno, id(node) in local_nodes


def layer_violations(root: Path) -> list[str]:
    """Every import in `root/ldm` that breaks the floor plan, as `path:line: message`."""
    problems = []
    for path in sorted((root / "ldm").rglob("*.py")):
        rel = path.relative_to(root)
        parts = rel.with_suffix("").parts
        if len(parts) < 2 or parts[1] == "__init__":  # ldm/__init__.py is the public front door
            continue
        me = parts[1]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
        for name, line, local in _ldm_imports(tree):
            pieces = name.split(".")
            if len(pieces) < 2:
                problems.append(f"{rel}:{line}: imports the top-level `ldm` package; import the module itself")
                continue
            other = pieces[1]
            if me not in RANKS or other not in RANKS:
                unknown = me if me not in RANKS else other
                problems.append(f"{rel}:{line}: `ldm.{unknown}` has no layer; add it to RANKS in tests/test_layers.py "
                                f"and to docs/ARCHITECTURE.md")
            elif RANKS[other] > RANKS[me]:
                problems.append(f"{rel}:{line}: `ldm.{me}` (layer {RANKS[me]}) imports `{name}` from a layer above "
                                f"(layer {RANKS[other]})")
            elif RANKS[other] == RANKS[me] and other != me and RANKS[me] > 0 and (me, other) not in ALLOWED_SIDEWAYS:
                problems.append(f"{rel}:{line}: `ldm.{me}` imports `{name}` from a sibling layer; "
                                f"move the shared piece down a layer")
            if local and OPTIONAL_MODULES.get(name, (None, None))[1] != rel.as_posix():
                problems.append(f"{rel}:{line}: function-local import of `{name}`; ldm imports go at module level")
    return problems


def test_the_package_follows_the_floor_plan():
    problems = layer_violations(ROOT)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(OPTIONAL_MODULES))
def test_an_optional_module_imports_its_heavy_package_at_its_top(name):
    """The exception is kept only while it is needed: the module imports the optional package at module level."""
    package, _ = OPTIONAL_MODULES[name]
    tree = ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert package in top, f"{name} no longer imports {package} at its top: import it at module level"


def test_a_planted_upward_import_is_caught(tmp_path):
    shutil.copytree(ROOT / "ldm", tmp_path / "ldm", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    target = tmp_path / "ldm" / "diffusion" / "samplers.py"
    target.write_text(target.read_text(encoding="utf-8") + "\nfrom ldm.pipeline.load import load_pipeline\n",
                      encoding="utf-8")
    (tmp_path / "ldm" / "models" / "planted.py").write_text(
        "import importlib\n\n\ndef f():\n    from ldm.io.checkpoint import load_into\n"
        "    return load_into, importlib.import_module(\"ldm.data.loader\")\n\n\ndef g():\n"
        "    return importlib.import_module(\"ldm.models.group_norm_kernel\")\n", encoding="utf-8")
    problems = layer_violations(tmp_path)
    assert any("ldm/diffusion/samplers.py" in p and "layer above" in p for p in problems), problems
    assert any("ldm/models/planted.py" in p and "layer above" in p for p in problems), problems
    assert any("ldm/models/planted.py" in p and "function-local" in p for p in problems), problems
    assert any("ldm/models/planted.py" in p and "`ldm.data.loader`" in p for p in problems), problems
    # an optional module is function-local only in the module named for it
    assert any("ldm/models/planted.py" in p and "`ldm.models.group_norm_kernel`" in p for p in problems), problems
    assert not any("fused_group_norm.py" in p for p in problems), problems
