"""The README is the user's door: it must document every flag, give CI's commands and name every dependency."""

import ast
import dataclasses
import importlib.metadata
import os
import re
import sys

from eval_vae import EvalConfig
from vae.train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", ".whl", "outputs", "__pycache__"}


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def readme_test_block() -> list[str]:
    """The `&&`-separated commands of the README's setup-and-test block (the second bash block)."""
    blocks = re.findall(r"```bash\n(.*?)```", read("README.md"), flags=re.S)
    setup_and_test = [b for b in blocks[:2] if "pytest" in b]
    assert setup_and_test, "the README's second command block must set up and run the tests"
    line = setup_and_test[0].strip().splitlines()[-1]
    return [part.strip() for part in line.split("&&")]


def test_every_flag_is_documented():
    readme = read("README.md")
    for cls in (TrainConfig, EvalConfig):
        missing = [f.name for f in dataclasses.fields(cls) if f"`--{f.name}`" not in readme]
        assert not missing, f"{cls.__name__} flags missing from README.md: {missing}"


def test_ci_runs_the_readme_test_command():
    commands = readme_test_block()
    ci = read(".ci", "run")
    assert commands[-1] == "HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests"
    assert commands[-1] in ci.splitlines()
    # The README's setup installs what CI installs: the runtime and the test requirements.
    install = next(c for c in commands if "pip install" in c)
    files = re.findall(r"-r (\S+)", install)
    assert files == ["requirements.txt", "requirements-test.txt"], install
    ci_install = next(line for line in ci.splitlines() if "pip install" in line and "-r" in line)
    assert re.findall(r"-r (\S+)", ci_install) == files, ci_install
    # CI lints before testing, with the settings in pyproject.toml.
    assert ".venv/bin/ruff check ." in ci and ".venv/bin/ruff format --check ." in ci


def test_readme_points_at_the_recipe_and_the_quick_loop():
    readme = read("README.md")
    assert os.path.isfile(os.path.join(ROOT, "docs", "recipe.md"))
    assert "docs/recipe.md" in readme, "the README must link the recipe (docs/recipe.md)"
    assert '-m "not e2e"' in readme, 'the README must give the quick unit loop (pytest -m "not e2e")'
    assert "e2e: " in read("pyproject.toml"), "the e2e marker must stay registered"


def requirement_pins(name: str) -> dict[str, str]:
    """{normalised distribution name: pinned version} of a requirements file (and the files it includes)."""
    pins = {}
    for line in read(name).splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            pins.update(requirement_pins(line[3:].strip()))
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
        assert match, f"{name}: {line!r} is not pinned as name==version"
        pins[normalise(match.group(1))] = match.group(2)
    return pins


def normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def imported_top_level_modules() -> dict[str, str]:
    """{top-level module: a file importing it} over every Python file of the repository (absolute imports)."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            with open(path) as f:
                tree = ast.parse(f.read(), filename=path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], os.path.relpath(path, ROOT))
    return found


def first_party_modules() -> set[str]:
    """Modules of this repository: root packages and scripts, and the scripts of tests/ and benchmarks/."""
    names = set()
    for folder in (ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")):
        for entry in os.listdir(folder):
            if entry.endswith(".py"):
                names.add(entry[:-3])
            elif os.path.isfile(os.path.join(folder, entry, "__init__.py")):
                names.add(entry)
    return names


def test_every_imported_package_is_a_pinned_requirement():
    pins = requirement_pins("requirements-test.txt")
    runtime = requirement_pins("requirements.txt")
    assert "pytest" not in runtime and "ruff" not in runtime, "test tools belong in requirements-test.txt"
    distributions = importlib.metadata.packages_distributions()
    local = first_party_modules()
    missing = []
    for module, where in sorted(imported_top_level_modules().items()):
        if module in sys.stdlib_module_names or module in local or module == "__future__":
            continue
        names = [normalise(d) for d in distributions.get(module, [module])]
        if not any(n in pins for n in names):
            missing.append(f"{module} ({where})")
    assert not missing, f"imported but not in requirements*.txt: {missing}"
