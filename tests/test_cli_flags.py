"""Both scripts' `--help` keeps its flags and defaults: the list in fixtures/cli_flags.json was taken
from `--help` before the code was re-planned into packages, and a refactor must not change it.

A flag that is added, removed or given another default on purpose updates the list with
`PYTHONPATH=. python tests/test_cli_flags.py --write` (and says so in the commit message).
"""

import json
import os
import re
import sys

import pytest

import eval_vae
import train_vae

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "cli_flags.json")
SCRIPTS = {"train_vae.py": train_vae.main, "eval_vae.py": eval_vae.main}


def parse_help(text: str) -> dict[str, str | None]:
    """{invocation: default} of every option in an argparse --help text, e.g.
    {"--mixed_precision {no,fp16,bf16}": "None", "--use_ema, --no-use_ema": "False"}."""
    options = text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", options.strip("\n"))
    found = {}
    for entry in entries:
        first, *rest = entry.strip().split("\n")
        invocation, *help_start = re.split(r"\s{2,}", first, maxsplit=1)  # help on the same line, or below
        words = " ".join([*help_start, *rest]).split()
        default = re.search(r".*\(default: (.*)\)$", " ".join(words))  # the last one: a help text may say "default" too
        found[invocation] = default.group(1) if default else None
    return found


def help_of(script: str, capsys, monkeypatch) -> dict[str, str | None]:
    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping: one option per line where argparse allows
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script](["--help"])
    assert exit_info.value.code == 0
    return parse_help(capsys.readouterr().out)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_lists_the_same_flags_and_defaults_as_before(script, capsys, monkeypatch):
    with open(FIXTURE) as f:
        expected = json.load(f)[script]
    found = help_of(script, capsys, monkeypatch)
    assert len(found) > 20, f"parsed only {len(found)} options of {script} --help"
    assert found == expected


def test_parse_help_reads_flags_choices_and_defaults():
    text = (
        "usage: x\n\noptions:\n  -h, --help            show this help message and exit\n"
        "  --mode {a,b}          pick one (default: 'a')\n"
        "  --long_flag_name_that_wraps INT\n                        a number (default: 3)\n"
        "  --flag, --no-flag     a switch (default: False)\n"
    )
    assert parse_help(text) == {
        "-h, --help": None,
        "--mode {a,b}": "'a'",
        "--long_flag_name_that_wraps INT": "3",
        "--flag, --no-flag": "False",
    }


# ---------------------------------------------------------------------------------------------
# diffusers' flags: data aliases, a checkpoint's name inside --output_dir, any accelerate tracker
# ---------------------------------------------------------------------------------------------


def parse_train(argv):
    from common.cli import parse_config
    from training.config import TrainConfig

    return parse_config(TrainConfig, argv, "train_vae.py")[0]


def test_diffusers_data_flags_map_onto_one_source_each(tmp_path):
    from data import parse_source

    cfg = parse_train(
        ["--source", "/data/a", "--dataset_name", "user/pets", "--dataset_config_name", "cats"]
        + ["--image_column", "img", "--train_data_dir", "/data/b"]
    )
    assert cfg.source == ["/data/a", "path=user/pets,config=cats,image_column=img", "/data/b"]
    spec = parse_source(cfg.source[1])
    assert (spec.path, spec.config, spec.image_column) == ("user/pets", "cats", "img")
    # Alone, each is exactly the --source of the same path (so a resume with either form sees no change).
    assert parse_train(["--dataset_name", "user/pets"]).source == parse_train(["--source", "user/pets"]).source
    assert parse_train(["--train_data_dir", "/x"]).source == ["/x"]
    config = tmp_path / "run.yaml"
    config.write_text("dataset_name: user/pets\nimage_column: picture\n")
    assert parse_train(["--config", str(config)]).source == ["path=user/pets,image_column=picture"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image_column", "img"], "--image_column needs --dataset_name"),
        (["--dataset_config_name", "c", "--train_data_dir", "/x"], "--dataset_config_name needs --dataset_name"),
        (["--dataset_name", "a=b"], "cannot be written as a --source"),
        (["--dataset_name", "user/pets", "--mixture", "transfusion", "--data_root", "/d"], "not both"),
    ],
)
def test_bad_diffusers_data_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("script", ["train_vae.py", "eval_vae.py"])
def test_flag_list_shows_each_alias_once_with_its_target(script):
    """Every alias of the script's config class (diffusers' data flags, --model_config_name_or_path, ...): one row in
    its section of docs/flags.md, with what it maps to."""
    from common.cli import aliases_of
    from evaluation.config import EvalConfig
    from training.config import MODEL_ALIASES, TrainConfig

    config = {"train_vae.py": TrainConfig, "eval_vae.py": EvalConfig}[script]
    with open(os.path.join(os.path.dirname(FIXTURE), "..", "..", "docs", "flags.md")) as f:
        sections = f.read().split("\n## ")
    (text,) = [s for s in sections if s.startswith(script)]
    aliases = aliases_of(config)
    if config is TrainConfig:
        assert set(MODEL_ALIASES) <= set(aliases) and "model_config_name_or_path" in [a.name for a in aliases]
    for alias in aliases:
        rows = [line for line in text.splitlines() if f"`--{alias.name}`" in line]
        assert len(rows) == 1 and alias.maps_to.replace("|", "\\|") in rows[0], (alias.name, rows)


def test_report_to_takes_any_accelerate_tracker_and_a_missing_one_is_one_line(monkeypatch, capsys):
    from accelerate.utils import LoggerType

    import training.config

    for tracker in LoggerType:  # every tracker accelerate knows is a choice
        monkeypatch.setattr(training.config.tracking, "get_available_trackers", lambda t=tracker: [t])
        assert parse_train(["--report_to", tracker.value]).report_to == tracker.value
    monkeypatch.setattr(training.config.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    monkeypatch.setattr(train_vae, "build_vae", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exit_info:
        train_vae.main(["--report_to", "mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "--report_to mlflow needs the mlflow package (pip install mlflow); installed trackers: tensorboard" in err[0]


def test_resume_from_a_checkpoint_name_looks_inside_output_dir(tmp_path, monkeypatch):
    from common.errors import CheckpointError
    from training import checkpointing

    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / checkpointing.TRAINER_STATE).write_text("{}")
    elsewhere = tmp_path / "cwd"
    (elsewhere / "checkpoint-7").mkdir(parents=True)
    (elsewhere / "checkpoint-7" / checkpointing.TRAINER_STATE).write_text("{}")
    monkeypatch.chdir(elsewhere)
    assert checkpointing.resolve(str(out), "checkpoint-5") == str(out / "checkpoint-5")
    assert checkpointing.resolve(str(out), "latest") == str(out / "checkpoint-5")
    assert checkpointing.resolve(str(out), "./checkpoint-7") == "./checkpoint-7"  # a path: as given
    with pytest.raises(CheckpointError, match=r"'checkpoint-7' in --output_dir .* is not a complete checkpoint"):
        checkpointing.resolve(str(out), "checkpoint-7")  # a name: in --output_dir only, as diffusers


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import contextlib
    import io

    sys.argv = sys.argv[:1]
    os.environ["COLUMNS"] = "100000"
    listing = {}
    for name, main in SCRIPTS.items():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main(["--help"])
        listing[name] = parse_help(buffer.getvalue())
    with open(FIXTURE, "w") as f:
        json.dump(listing, f, indent=1, sort_keys=True)
        f.write("\n")
    print({k: len(v) for k, v in listing.items()})
