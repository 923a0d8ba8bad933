"""The suite's own rules: test modules never import each other (shared pieces live in helpers.py and conftest.py)."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(tree: ast.AST):
    """(line, module name) of every import in `tree`, and in any string constant that is itself Python code."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value:
            try:  # a subprocess script (python -c ...) must follow the rule too
                inner = ast.parse(node.value)
            except SyntaxError:
                continue
            yield from ((node.lineno, name) for _, name in imported_modules(inner))


def is_test_module(name: str) -> bool:
    """`test_x`, `tests.test_x` or `tests` itself: a module of this suite other than helpers / conftest."""
    parts = name.split(".")
    return (parts[0] == "tests" and parts[1:2] != ["helpers"]) or parts[0].startswith("test_")


def test_is_test_module_tells_test_modules_from_others():
    assert is_test_module("test_plans") and is_test_module("tests.test_plans") and is_test_module("tests")
    assert not any(map(is_test_module, ["helpers", "tests.helpers", "ldm.diffusion", "pytest", "testing"]))


def test_the_check_sees_imports_in_code_and_in_subprocess_scripts():
    # planted as TEST_ so that this file's own constant does not trip test_no_test_module_imports_another
    source = ('import os\nfrom TEST_plans import SD15\n'
              'SCRIPT = """\nimport sys\nfrom TEST_train_model import TINY\n"""\n').replace("TEST_", "test_")
    found = [name for _, name in imported_modules(ast.parse(source)) if is_test_module(name)]
    assert found == ["test_plans", "test_train_model"]


def test_no_test_module_imports_another():
    offenders = [f"{path.name}:{line} imports {name}"
                 for path in sorted(TESTS.glob("test_*.py"))
                 for line, name in imported_modules(ast.parse(path.read_text(), filename=str(path)))
                 if is_test_module(name)]
    assert len(list(TESTS.glob("test_*.py"))) > 10  # the glob found the suite
    assert offenders == [], "move what they share into tests/helpers.py or a conftest fixture: " + "; ".join(offenders)
