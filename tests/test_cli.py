import subprocess
import sys

import pytest

from pneumoscan.cli import build_parser

COMMANDS = ["train", "evaluate", "predict", "export", "serve", "demo", "data"]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_explained(command):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest not in ("help",) and action.option_strings:
            assert action.help, f"{command} {action.option_strings} has no help"


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["train", "--data", "/no/such/folder", "--out", "/tmp/x"], "/no/such/folder: data folder not found"),
        (["evaluate", "--data", "/no/such/folder", "--model", "/no/bundle"], "/no/such/folder: data folder not found"),
        (["predict", "x.jpeg", "--model", "/no/bundle"], "/no/bundle: not a model bundle"),
    ],
)
def test_configuration_errors_are_one_line_and_exit_2(args, fragment):
    done = _cli(*args)
    assert done.returncode == 2
    assert fragment in done.stderr and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


@pytest.mark.data
def test_unknown_backbone_exits_2(small_data, tmp_path):
    done = _cli("train", "--data", small_data, "--out", tmp_path, "--backbone", "resnet9", "--limit", "8")
    assert done.returncode == 2 and "unknown backbone 'resnet9'" in done.stderr


@pytest.mark.data
def test_data_check_reports(small_data):
    done = _cli("data", "check", small_data, "--quiet")
    assert done.returncode == 0
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.strip()}
    assert rows["train"] == ["100", "100", "200"] and rows["test"] == ["40", "40", "80"]
    assert "unreadable files: 0" in done.stdout and "patients in more than one split" in done.stdout


def test_usage_errors_are_one_line_and_exit_2():
    for args in (["predict"], ["train", "--epochs", "many"], ["frobnicate"]):
        done = _cli(*args)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "--help" in done.stderr
