"""The README is the user's door: it must give CI's commands, point at the docs and name every dependency;
docs/flags.md, the flag reference, must be what the parsers generate today.

Regenerate docs/flags.md after changing a flag: `PYTHONPATH=. python tests/test_readme.py --write-flags`;
constraints.txt's pins of what the requirements pull in, after changing a requirement's tested version (in the
environment installed with it): `PYTHONPATH=. python tests/test_readme.py --write-constraints`.
"""

import ast
import dataclasses
import importlib.metadata
import inspect
import os
import re
import sys

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from common.cli import markdown_reference
from evaluation.config import EvalConfig
from losses import TransfusionLoss
from training.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", ".whl", "outputs", "__pycache__"}
TRANSITIVE_MARKER = "# What they pull in (written by `python tests/test_readme.py --write-constraints`):\n"


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
            "(`training/config.py`, `evaluation/config.py`) by `PYTHONPATH=. python tests/test_readme.py --write-flags`; "
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
        "train_decoder_only", "freeze", "shuffle_block", "vf_model", "learning_rate",
        "disc_learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "use_ema",
        "ema_decay", "seed",
    )  # fmt: skip
    assert config.CHECKED_AS_MODEL == ("model_config", "latent_channels")
    assert config.RECIPE_KEYS == (
        "l1_weight", "lpips_weight", "gan_weight", "id_weight", "kl_weight", "disc_start",
        "adaptive_weight_max", "gan_ramp_steps", "lecam_weight", "equivariance_mode", "eqvae_low_res_prob",
        "equivariance_weight", "equivariance_prob",
        "equivariance_scales", "equivariance_rotations", "latent_noise_aug", "vf_weight", "vf_margin_cos", "vf_margin_distmat",
        "vf_margin_start", "vf_model",
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
    # The README's setup installs what CI installs: the runtime and the test requirements, at the tested versions.
    install = next(c for c in commands if "pip install" in c)
    files = re.findall(r"-r (\S+)", install)
    assert files == ["requirements.txt", "requirements-test.txt"], install
    assert re.findall(r"-c (\S+)", install) == ["constraints.txt"], install
    ci_install = next(line for line in ci.splitlines() if "pip install" in line and "-r" in line)
    assert re.findall(r"-r (\S+)", ci_install) == files, ci_install
    assert re.findall(r"-c (\S+)", ci_install) == ["constraints.txt"], ci_install
    # The demo's setup (the first block) installs the same tested versions.
    demo = re.findall(r"```bash\n(.*?)```", read("README.md"), flags=re.S)[0]
    assert "pip install -r requirements.txt -c constraints.txt" in demo, demo
    # CI lints before testing, with the settings in pyproject.toml.
    assert ".venv/bin/ruff check ." in ci and ".venv/bin/ruff format --check ." in ci


def test_readme_points_at_the_recipe_and_the_quick_loop():
    readme = read("README.md")
    assert os.path.isfile(os.path.join(ROOT, "docs", "recipe.md"))
    assert "docs/recipe.md" in readme, "the README must link the recipe (docs/recipe.md)"
    assert '-m "not e2e"' in readme, 'the README must give the quick unit loop (pytest -m "not e2e")'
    assert "e2e: " in read("pyproject.toml"), "the e2e marker must stay registered"


def requirements(name: str) -> dict[str, SpecifierSet]:
    """{normalised distribution name: version range} of a requirements file (and the files it includes)."""
    found = {}
    for line in read(name).splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            found.update(requirements(line[3:].strip()))
            continue
        requirement = Requirement(line)
        assert not requirement.marker and not requirement.url, f"{name}: {line!r}: a plain name and range, please"
        found[normalise(requirement.name)] = requirement.specifier
    return found


def constraint_pins() -> dict[str, str]:
    """{normalised distribution name: version} of constraints.txt, each pinned as name==version."""
    pins = {}
    for line in read("constraints.txt").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
            assert match, f"constraints.txt: {line!r} is not pinned as name==version"
            pins[normalise(match.group(1))] = match.group(2)
    return pins


def normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def installed_closure(names) -> dict[str, str]:
    """{normalised name: installed version} of the distributions `names` need here, transitively: each
    distribution's requirements whose markers hold on this machine (with the extras asked for)."""
    found, done, todo = {}, set(), [(name, frozenset()) for name in names]
    while todo:
        name, extras = todo.pop()
        if (normalise(name), extras) in done:
            continue
        done.add((normalise(name), extras))
        dist = importlib.metadata.distribution(name)
        found[normalise(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in (extras or {""})]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return found


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


def test_every_imported_package_is_a_requirement():
    pins = requirements("requirements-test.txt")
    runtime = requirements("requirements.txt")
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


def test_requirements_are_ranges_and_constraints_pin_the_tested_set():
    """requirements*.txt give ranges (joining an environment that has its own torch); constraints.txt pins
    the whole tested set: each requirement inside its range and every package they pull in here, nothing else,
    and the environment the tests run in has those versions."""
    wanted = requirements("requirements-test.txt")
    pins = constraint_pins()
    needed = installed_closure(wanted)
    assert set(pins) == set(needed), (
        f"constraints.txt must pin the requirements and what they pull in: missing "
        f"{sorted(set(needed) - set(pins))}, extra {sorted(set(pins) - set(needed))} "
        "(regenerate: python tests/test_readme.py --write-constraints)"
    )
    exact = [name for name, spec in wanted.items() if any(s.operator in ("==", "===") for s in spec)]
    assert not exact, f"requirements pinned exactly (put the pin in constraints.txt, a range here): {exact}"
    outside = [
        f"{n}=={pins[n]} not in {wanted[n]}" for n in wanted if not wanted[n].contains(pins[n], prereleases=True)
    ]
    assert not outside, f"constraints.txt pins outside their requirement's range: {outside}"
    for heavy in ("torch", "torchvision"):
        spec = wanted[heavy]
        assert any(s.operator == ">=" for s in spec) and any(s.operator == "<" for s in spec), f"{heavy}: {spec}"
    installed = {}
    for name in pins:
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed[name] = None
    # Local builds (torch's "+cpu"/"+cu128") are the same release.
    differ = {
        n: (v, pins[n]) for n, v in installed.items() if v is None or Version(v).public != Version(pins[n]).public
    }
    assert not differ, f"this environment is not constraints.txt's (installed, pinned): {differ}"


if __name__ == "__main__" and sys.argv[1:] == ["--write-constraints"]:
    text = read("constraints.txt")
    head, marker, _ = text.partition(TRANSITIVE_MARKER)
    assert marker, f"constraints.txt lacks the line {TRANSITIVE_MARKER!r}"
    direct = set(requirements("requirements-test.txt"))
    pulled = {n: v for n, v in installed_closure(direct).items() if n not in direct}
    with open(os.path.join(ROOT, "constraints.txt"), "w") as f:
        f.write(head + marker + "".join(f"{n}=={v}\n" for n, v in sorted(pulled.items())))
    print(f"wrote constraints.txt: {len(pulled)} packages pulled in by the requirements")

if __name__ == "__main__" and sys.argv[1:] == ["--write-flags"]:
    with open(FLAGS_MD, "w") as f:
        f.write(flag_reference())
    print(f"wrote {FLAGS_MD}")
