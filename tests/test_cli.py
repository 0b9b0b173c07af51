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


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["predict", "x.jpeg", "--batch-size", "0"], "--batch-size: 0 must be at least 1"),
        (["evaluate", "--data", "x", "--bootstrap", "0"], "--bootstrap: 0 must be at least 1"),
        (["serve", "--port", "99999"], "--port: 99999 must be at most 65535"),
        (["serve", "--workers", "-2"], "--workers: -2 must be at least 1"),
        (["serve", "--header-timeout", "0"], "--header-timeout: 0 must be above 0"),
        (["train", "--data", "x", "--out", "y", "--dropout", "2"], "--dropout must be >= 0 and < 1, got 2.0"),
        (["train", "--data", "x", "--out", "y", "--rotation", "-400"], "--rotation must be >= 0 and <= 180"),
        (["train", "--data", "x", "--out", "y", "--workers", "-2"], "--workers must be >= 0"),
        (["train", "--data", "x", "--out", "y", "--lr", "nan"], "--lr must be a finite number"),
        (["train", "--data", "x", "--out", "y", "--target-sensitivity", "1.5"], "--target-sensitivity must be"),
        (["train", "--out", "y"], "train needs --data ROOT"),
    ],
)
def test_numeric_options_out_of_range(args, fragment):
    done = _cli(*args)
    assert done.returncode == 2, done.stderr
    assert fragment in done.stderr and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_train_options_come_from_the_config_definitions():
    """Every TrainConfig and Augmentation option is a train flag with its default in the help."""
    from dataclasses import fields

    from pneumoscan.data import Augmentation
    from pneumoscan.recipe import TrainConfig
    from pneumoscan.settings import flag_name

    parser = build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    for cls in (TrainConfig, Augmentation):
        for f in fields(cls):
            if "spec" in f.metadata:
                assert flag_name(f) in flags, f.name
    args = parser.parse_args(["train", "--data", "d", "--out", "o", "--zoom", "0.2", "--no-hflip"])
    from pneumoscan.settings import from_args

    cfg = from_args(TrainConfig, args, augmentation=from_args(Augmentation, args))
    assert cfg.augmentation.zoom == 0.2 and not cfg.augmentation.hflip and cfg.epochs == TrainConfig().epochs
    assert cfg.operating_rule == "balanced"
