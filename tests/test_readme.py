"""The README is the user's door: it must give CI's commands, point at the docs and name every dependency;
docs/flags.md, the flag reference, must be what the parsers generate today.

Regenerate docs/flags.md after changing a flag: `PYTHONPATH=. python tests/test_readme.py --write-flags`.
"""

import ast
import dataclasses
import importlib.metadata
import inspect
import os
import re
import sys

from common.cli import markdown_reference
from eval_vae import EvalConfig
from losses import TransfusionLoss
from training.config import TrainConfig

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


FLAGS_MD = os.path.join(ROOT, "docs", "flags.md")


def flag_reference() -> str:
    """docs/flags.md as the parsers define the flags now."""
    return "\n".join(
        [
            "# Flags",
            "",
            "Every flag of `train_vae.py` and `eval_vae.py`, generated from their config dataclasses "
            "(`training/config.py`, `eval_vae.py`) by `PYTHONPATH=. python tests/test_readme.py --write-flags`; "
            "a test fails when this file is stale. Any flag can also be set in a YAML or JSON file given with "
            "`--config`; flags on the command line win. A bad flag or value is one line and exit status 2, "
            "before any model is built.",
            "",
            "## train_vae.py",
            "",
            "`resume`: what a resumed run does when the flag differs from the checkpoint's. `fixed`: refused "
            "(the restored optimizer, EMA or data state holds the old value; start a new run with `--init_from` "
            "instead); `warn`: takes effect, named in a warning; `free`: takes effect silently (outputs, "
            "intervals, Hub); `model`: compared through the model's shape. `demo`: the value the offline demo "
            "(no data flags) uses.",
            "",
            markdown_reference(TrainConfig, {"resume": "resume", "demo": "demo"}),
            "## eval_vae.py",
            "",
            markdown_reference(EvalConfig),
        ]
    )


def test_flag_reference_is_generated_and_current():
    with open(FLAGS_MD) as f:
        assert f.read() == flag_reference(), (
            "docs/flags.md is stale: PYTHONPATH=. python tests/test_readme.py --write-flags"
        )
    readme = read("README.md")
    assert "docs/flags.md" in readme, "the README must link the flag reference"


def test_every_training_flag_carries_its_facts():
    """Adding a flag is one edit: its field says its resume policy (and, where they apply, recipe, loss
    keyword, demo value, bound); every list the trainer uses is derived from those fields."""
    from training import config

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    missing = [name for name, f in fields.items() if f.metadata.get("resume") not in config.RESUME_POLICIES]
    assert not missing, f"fields without a resume policy: {missing}"
    assert set(config.FIXED_ON_RESUME) == {n for n, f in fields.items() if f.metadata["resume"] == "fixed"}
    # The derived sets, as the trainer uses them: a flag moved between them is a deliberate change.
    assert config.FIXED_ON_RESUME == (
        "train_decoder_only", "freeze", "shuffle_block", "dataloader_num_workers", "vf_model", "learning_rate",
        "disc_learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "use_ema",
        "ema_decay", "seed",
    )  # fmt: skip
    assert config.CHECKED_AS_MODEL == ("model_config", "latent_channels")
    assert config.RECIPE_KEYS == (
        "l1_weight", "lpips_weight", "gan_weight", "id_weight", "kl_weight", "disc_start",
        "adaptive_weight_max", "gan_ramp_steps", "lecam_weight", "equivariance_weight", "equivariance_prob",
        "equivariance_scales", "equivariance_rotations", "vf_weight", "vf_margin_cos", "vf_margin_distmat",
    )  # fmt: skip
    assert config.LOSS_KEYWORDS["id_checkpoint"] == "moco_weights"
    cfg = TrainConfig()
    assert set(cfg.loss_kwargs()) < set(inspect.signature(TransfusionLoss).parameters)
    assert config.DEMO_DEFAULTS["model_config"] == "tiny" and config.DEMO_DEFAULTS["max_train_steps"] == 900
    demo = config.apply_demo_defaults(TrainConfig(), explicit={"max_train_steps"})
    assert demo.model_config == "tiny" and demo.max_train_steps == cfg.max_train_steps


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


if __name__ == "__main__" and sys.argv[1:] == ["--write-flags"]:
    with open(FLAGS_MD, "w") as f:
        f.write(flag_reference())
    print(f"wrote {FLAGS_MD}")
