"""training/ runs in the SageMaker TF 2.14.1 image, which has Python 3.10: keep it 3.10-clean and standalone.

Checks: every training/*.py parses with the 3.10 grammar; it byte-compiles under a real 3.10 interpreter
(when one is installed, e.g. by pyenv) whose standard library also has everything the module imports from it;
it imports nothing from the rest of the repository (serving, pipelines, infra, marketrank are not shipped).
"""

from __future__ import annotations

import ast
import glob
import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ROOT / "training"
SOURCES = sorted(TRAINING.glob("*.py"))
FORBIDDEN = {"serving", "pipelines", "infra", "marketrank"}
HOST_STDLIB = json.dumps(sorted(sys.stdlib_module_names))
ENV_310 = {**os.environ, "PYENV_VERSION": "3.10"}


@cache
def python310() -> str | None:
    """A working Python 3.10 interpreter, or None (a pyenv shim may exist without 3.10 being active)."""
    roots = [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv"), "/root/.pyenv"]
    candidates = [str(ROOT / ".venv310" / "bin" / "python")]
    for root in filter(None, roots):
        pattern = os.path.join(root, "versions", "3.10.*", "bin", "python")
        candidates += sorted(glob.glob(pattern), reverse=True)
    candidates += [shutil.which("python3.10") or ""]
    for candidate in dict.fromkeys(filter(None, candidates)):
        if not os.access(candidate, os.X_OK):
            continue
        try:
            out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=20, env=ENV_310)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 10)":
            return candidate
    return None


# Run by the 3.10 interpreter: compile each file (no .pyc written) and resolve its stdlib imports. argv[1] is
# the JSON list of the test runner's stdlib names, so a module new in 3.11 (tomllib) counts as stdlib too.
CHECK_310 = r"""
import ast, importlib, json, sys
stdlib = set(sys.stdlib_module_names) | set(json.loads(sys.argv[1]))
problems = []
for path in sys.argv[2:]:
    source = open(path, encoding="utf-8").read()
    try:
        compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as err:
        problems.append(f"{path}:{err.lineno}: {err.msg}")
        continue
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            pairs = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            pairs = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in pairs:
            if module.split(".")[0] not in stdlib:
                continue
            try:
                mod = importlib.import_module(module)
                if name is not None and name != "*" and not hasattr(mod, name):
                    importlib.import_module(f"{module}.{name}")
            except ImportError:
                problems.append(f"{path}:{node.lineno}: {module}{'.' + name if name else ''} is not in 3.10")
print(json.dumps(problems))
"""


IMPORT_CALLS = ("import_module", "__import__")


def imported_modules(source: str, filename: str = "<src>") -> list[tuple[int, str]]:
    """(line, absolute module) of every import, nested ones and import_module("...") included."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in IMPORT_CALLS):
            found.append((node.lineno, node.args[0].value))
    return found


def forbidden_imports(source: str, filename: str = "<src>") -> list[str]:
    return [f"{filename}:{line}: imports {module}" for line, module in imported_modules(source, filename)
            if module.split(".")[0] in FORBIDDEN]


def test_training_sources_found() -> None:
    names = {p.name for p in SOURCES}
    assert {"metrics.py", "feature_spec.py", "propensity.py", "report.py", "train.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_parses_with_python310_grammar(path: Path) -> None:
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))


def test_python310_grammar_check_catches_311_syntax() -> None:
    # except* (PEP 654) is 3.11-only: the check above must reject it.
    source = "try:\n    pass\nexcept* ValueError:\n    pass\n"
    ast.parse(source, feature_version=(3, 11))
    with pytest.raises(SyntaxError):
        ast.parse(source, feature_version=(3, 10))


def test_byte_compiles_with_python310() -> None:
    interpreter = python310()
    if interpreter is None:
        pytest.skip("no Python 3.10 interpreter found (pyenv 3.10.x or python3.10)")
    out = subprocess.run([interpreter, "-c", CHECK_310, HOST_STDLIB, *map(str, SOURCES)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT, env=ENV_310)
    assert out.returncode == 0, out.stderr
    problems = json.loads(out.stdout.strip().splitlines()[-1])
    assert problems == [], "\n".join(problems)


def test_python310_check_catches_311_only_code(tmp_path: Path) -> None:
    interpreter = python310()
    if interpreter is None:
        pytest.skip("no Python 3.10 interpreter found (pyenv 3.10.x or python3.10)")
    bad = tmp_path / "bad.py"
    bad.write_text("import tomllib\nfrom typing import Self\nfrom datetime import UTC\n")
    out = subprocess.run([interpreter, "-c", CHECK_310, HOST_STDLIB, str(bad)],
                         capture_output=True, text=True, timeout=60, env=ENV_310)
    assert out.returncode == 0, out.stderr
    problems = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(problems) == 3, problems
    assert sys.version_info >= (3, 11)  # the same imports work here, so only the 3.10 run can catch them


def test_training_imports_nothing_from_the_rest_of_the_repo() -> None:
    problems = []
    for path in SOURCES:
        problems += forbidden_imports(path.read_text(encoding="utf-8"), path.name)
    assert problems == [], "\n".join(problems)


def test_forbidden_import_walker_sees_nested_imports() -> None:
    source = (
        "import os\n"
        "from training import metrics\n"
        "def f():\n"
        "    from marketrank.simulator import simulate\n"
        "    import serving.app as app\n"
        "    importlib.import_module('pipelines.build')\n"
        "from . import report\n"
    )
    assert forbidden_imports(source) == [
        "<src>:4: imports marketrank.simulator",
        "<src>:5: imports serving.app",
        "<src>:6: imports pipelines.build",
    ]


def test_training_requirements_pin_the_images_tensorflow() -> None:
    """The SageMaker images install TensorFlow as tensorflow-cpu/-gpu: an unpinned `tensorflow` requirement (TF-Ranking
    has one) would make pip add a newer TensorFlow over it. training/requirements.txt pins the pipeline's version."""
    import tomllib

    from pipelines.definition import TF_VERSION

    pins = {}
    for line in (ROOT / "training" / "requirements.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name] = version
    assert pins["tensorflow"] == pins["tensorflow-serving-api"] == TF_VERSION
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    for name in ("tensorflow", "tensorflow-ranking"):
        assert f"{name}=={pins[name]}" in project, f"{name}: training/requirements.txt and pyproject.toml differ"
