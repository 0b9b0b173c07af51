import argparse
import contextlib
import io
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest

from pneumoscan.cli.main import build_parser, main
from pneumoscan.core.errors import ConfigError
from pneumoscan.core.settings import flag_name
from pneumoscan.evaluation import evaluate as evaluation
from pneumoscan.evaluation import verify
from pneumoscan.inference.classifier import Classifier
from pneumoscan.io import prepare as data_prepare
from pneumoscan.serving import service
from pneumoscan.training import calibrate


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "pneumoscan.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def _subparsers(parser=None):
    """Every command's parser by its name ("data check" for the nested ones)."""
    parser = parser or build_parser()
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _subparsers(sub)
                found.update({f"{name} {k}": v for k, v in nested.items()} if nested else {name: sub})
    return found


def test_every_command_lists_every_declared_option_with_help():
    """Each command's --help names every option its options class declares, and every argument of every
    command (declared or not) has help text."""
    from pneumoscan.cli.main import options_of
    from pneumoscan.core.options import COMMANDS as DECLARED

    parsers = _subparsers()
    assert set(parsers) == set(DECLARED) | {"train", "heads fit"}
    for command, sub in parsers.items():
        text = sub.format_help()
        for cls in options_of(command):
            for f in fields(cls):
                if "spec" in f.metadata:
                    assert flag_name(f) in text, f"{command} --help lacks {flag_name(f)}"
        for action in sub._actions:
            if action.dest != "help":
                assert action.help and action.help.strip(), (
                    f"{command} {action.option_strings or action.dest} has no help"
                )


def _in_process(*args: str) -> tuple[int, str]:
    """``pneumoscan ARGS`` run here (no new interpreter): its exit code and stderr."""
    err = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, err.getvalue()


def _api_error(call) -> str:
    with pytest.raises(ConfigError) as raised:
        call()
    return str(raised.value)


# (command line, the same values given to the Python API)
SAME_VALUES = [
    (["evaluate", "--data", "x", "--bootstrap", "0"], lambda: evaluation.evaluate(Path("x"), n_resamples=0)),
    (["evaluate", "--data", "x", "--bootstrap", "many"], lambda: evaluation.evaluate("x", n_resamples="many")),
    (["evaluate", "--data", "x", "--cross-fit", "1"], lambda: evaluation.evaluate("x", cross_fit=1)),
    (["evaluate", "--data", "x", "--seed", "-1"], lambda: evaluation.evaluate("x", seed=-1)),
    (["evaluate", "--data", ""], lambda: evaluation.evaluate("")),
    (
        ["calibrate", "--data", "x", "--out", "y", "--operating-rule", "best"],
        lambda: calibrate.calibrate_bundle("x", "y", rule="best"),
    ),
    (
        ["calibrate", "--data", "x", "--out", "y", "--target-sensitivity", "1.5"],
        lambda: calibrate.calibrate_bundle("x", "y", target_sensitivity=1.5),
    ),
    (["predict", "x.jpeg", "--engine", "tpu"], lambda: Classifier.load(engine="tpu")),
    (["serve", "--port", "99999"], lambda: service.serve(port=99999)),
    (["serve", "--header-timeout", "0"], lambda: service.serve(header_timeout=0)),
    (["serve", "--workers", "-2"], lambda: service.serve(workers=-2)),
    (["serve", "--max-upload-mb", "nan"], lambda: service.serve(max_upload_mb=float("nan"))),
    (
        ["data", "prepare", "x.zip", "--out", "r", "--size", "8"],
        lambda: data_prepare.prepare_dataset("x.zip", "r", size=8),
    ),
    (["verify", "--model", ""], lambda: verify.verify_bundle("")),
]


@pytest.mark.parametrize("args,call", SAME_VALUES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in SAME_VALUES])
def test_a_bad_value_gives_the_same_line_from_the_cli_and_the_api(args, call):
    code, err = _in_process(*args)
    expected = _api_error(call)
    assert code == 2 and err == f"pneumoscan: error: {expected}\n"
    assert expected.startswith(args[-2]), expected  # names the flag given the bad value


def test_batch_size_is_checked_by_the_api_as_by_the_cli():
    clf = Classifier.load(engine="onnx")
    code, err = _in_process("predict", "x.jpeg", "--batch-size", "0")
    assert code == 2 and err == f"pneumoscan: error: {_api_error(lambda: clf.predict([], batch_size=0))}\n"
    assert "--batch-size must be >= 1 and <= 4096, got 0" in err


def test_api_defaults_are_the_declared_ones():
    """The Python API's defaults are the options' defaults (one declaration), shown by help()."""
    import inspect

    from pneumoscan.core.settings import default_of

    functions = [evaluation.evaluate, calibrate.calibrate_bundle, service.serve, service.create_app]
    functions += [Classifier.load, Classifier.predict, data_prepare.prepare_dataset, verify.verify_bundle]
    for func in functions:
        cls, mapping = func.declared
        parameters = inspect.signature(func).parameters
        assert set(mapping) <= set(parameters), func.__qualname__
        for name, option_name in mapping.items():
            if parameters[name].default is not inspect.Parameter.empty:
                assert parameters[name].default == default_of(cls, option_name), (func.__qualname__, name)
    assert inspect.signature(evaluation.evaluate).parameters["rule"].default == "balanced"
    assert inspect.signature(calibrate.calibrate_bundle).parameters["rule"].default == "balanced"
    from pneumoscan.training.recipe import TrainConfig

    assert TrainConfig().operating_rule == "balanced"


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
    for args in (["predict"], ["evaluate"], ["frobnicate"]):
        done = _cli(*args)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "--help" in done.stderr


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["predict", "x.jpeg", "--batch-size", "0"], "--batch-size must be >= 1 and <= 4096, got 0"),
        (["serve", "--port", "99999"], "--port must be >= 1 and <= 65535, got 99999"),
        (["train", "--data", "x", "--out", "y", "--epochs", "many"], "--epochs must be int, got 'many'"),
        (["train", "--data", "x", "--out", "y", "--dropout", "2"], "--dropout must be >= 0 and < 1, got 2"),
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

    from pneumoscan.core.settings import flag_name
    from pneumoscan.training.augment import Augmentation
    from pneumoscan.training.recipe import TrainConfig

    parser = build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    for cls in (TrainConfig, Augmentation):
        for f in fields(cls):
            if "spec" in f.metadata:
                assert flag_name(f) in flags, f.name
    args = parser.parse_args(["train", "--data", "d", "--out", "o", "--zoom", "0.2", "--no-hflip"])
    from pneumoscan.core.settings import from_args

    cfg = from_args(TrainConfig, args, augmentation=from_args(Augmentation, args))
    assert cfg.augmentation.zoom == 0.2 and not cfg.augmentation.hflip and cfg.epochs == TrainConfig().epochs
    assert cfg.operating_rule == "balanced"


def test_export_and_train_options_are_checked_as_declared():
    """The export API takes its defaults and checks from the same declaration as the CLI; train's --resume
    and --quiet are declared options too."""
    from pneumoscan.core.errors import ConfigError
    from pneumoscan.training.export import export_bundle

    with pytest.raises(ConfigError, match="--calibration-images must be >= 2 and <= 100000, got 1"):
        export_bundle(calibration_images=1)
    with pytest.raises(ConfigError, match="--out: empty path"):
        export_bundle(out="")
    assert _in_process("train", "--resume", "")[0] == 2
