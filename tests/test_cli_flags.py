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
