"""Every command's options, declared once: type, default, allowed values and help (``train``'s are
:class:`recipe.TrainConfig`). The CLI builds each command's arguments from its class here
(:func:`settings.add_options`); the Python API functions take the same defaults and checks through
:func:`settings.declared`, so ``evaluate(..., n_resamples=0)`` and ``pneumoscan evaluate --bootstrap 0``
fail with the same line. Options shared by several commands (the bundle, the engine, the operating rule,
the bootstrap) are declared once below as functions and used by each command's class.

Light on purpose (no numpy beyond what ``metrics`` needs, no torch): ``pneumoscan --help`` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pneumoscan.core.metrics import OPERATING_RULES
from pneumoscan.core.settings import option

ENGINES = ("auto", "onnx", "torch")  # auto: ONNX Runtime when an ONNX model is at hand, else PyTorch
FORMATS = ("table", "csv", "jsonl")
PREDICT_BATCH = 8  # on a CPU larger batches buy no speed and cost memory

MODEL_HELP = (
    "model bundle folder, or the name of a bundled model (pneumoscan models lists them; an existing path "
    "wins over a name); default: the bundled default model"
)


def model_option(help: str = MODEL_HELP, flag: str | None = None) -> Any:
    return option(None, help, path=True, flag=flag)


def int8_option() -> Any:
    return option(
        False,
        "run the bundle's int8 ONNX model even where it is not the default (by default a bundle runs int8 "
        "where its int8 model was measured to answer as fp32 does; pneumoscan models says which)",
    )


def fp32_option() -> Any:
    return option(False, "run the fp32 model where the bundle's default is its int8 model")


def engine_option() -> Any:
    return option(
        "auto",
        "ONNX Runtime (the bundle's model or a cached export) where it can run, else PyTorch; torch needs the "
        'train extra (pip install "pneumoscan[train]")',
        choices=ENGINES,
    )


def operating_rule_option() -> Any:
    """The threshold rule of train, calibrate and evaluate --cross-fit. One default, ``balanced``: the model
    is trained with balanced class weights, so probability 0.5 is its class-balanced boundary, and a
    threshold fitted on few or well-separated images is not identifiable (Youden on saturated validation
    called 39% of healthy children PNEUMONIA, see docs/results.md). Fitting a threshold is asked for."""
    return option(
        "balanced",
        "threshold rule: 'balanced' keeps probability 0.5 (logit 0, the class-balanced boundary; only the "
        "temperature is fitted); 'youden' maximises Youden's J on the images it is fitted on (validation for "
        "train, the given images for calibrate, the other folds for evaluate --cross-fit)",
        choices=OPERATING_RULES,
        flag="--operating-rule",
    )


def target_sensitivity_option() -> Any:
    return option(
        None,
        "threshold instead of the rule: the highest one whose sensitivity on the images it is fitted on is at "
        "least this",
        above=0,
        at_most=1,
    )


def bootstrap_option() -> Any:
    return option(
        2000, "patient bootstrap resamples for the 95% intervals", at_least=1, at_most=100_000, flag="--bootstrap"
    )


def quiet_option(help: str = "no progress bars") -> Any:
    return option(True, help, flag="--quiet")


def seed_option(help: str) -> Any:
    return option(0, help, at_least=0, at_most=2**32 - 1)


def host_option() -> Any:
    return option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")


def port_option(default: int, what: str = "port") -> Any:
    return option(default, what, at_least=1, at_most=65535)


@dataclass
class DataCheckOptions:
    root: str = option(
        help="dataset root (Kaggle layout, or a flat NORMAL/PNEUMONIA folder)",
        positional=True,
        path=True,
        metavar="ROOT",
    )
    progress: bool = quiet_option("no progress bar")


@dataclass
class PrepareOptions:
    source: str = option(
        help="the downloaded zip, or the folder it was unpacked into", positional=True, path=True, metavar="SOURCE"
    )
    out: str = option(help="folder to write the layout into", path=True, metavar="ROOT")
    size: int | None = option(
        None,
        "write N x N grey JPEGs instead of the original files (aspect ratio squashed, as the model sees them; "
        "224 is the shipped model's size and makes training read small files)",
        at_least=32,
        at_most=1024,
        metavar="N",
    )
    max_total_gb: float = option(
        8.0,
        "refuse the whole archive, leaving nothing behind, when its images unpack to more than this many GB (of "
        "2^30 bytes), or the files written would come to more: checked from the sizes its entries declare before "
        "anything is written, then counted as bytes are read and written (the 5,856 Kermany films are about 1.2 GB; "
        "the Kaggle zip holds them twice). An entry unpacking to over 100 times its compressed size is refused, and "
        "so is an archive whose images do to over 10 times (real films: 1.0 to 1.1)",
        above=0,
        metavar="GB",
    )
    progress: bool = quiet_option("no progress bar")


@dataclass
class EvaluateOptions:
    data: str = option(help="dataset root (Kaggle layout) or a flat NORMAL/PNEUMONIA folder", path=True)
    split: str | None = option("test", "split folder to evaluate")
    models: list[str] | None = option(
        None, MODEL_HELP + "; give twice to compare two models", path=True, repeat=True, flag="--model", metavar="MODEL"
    )
    out: str = option("evaluation", "output folder", path=True)
    engine: str = engine_option()
    int8: bool = int8_option()
    fp32: bool = fp32_option()
    n_resamples: int = bootstrap_option()
    seed: int = seed_option("seed of the bootstrap and of the random image grid")
    cross_fit: int | None = option(
        None,
        "also report cross-fitted local calibration: K patient folds (5 when K is left out), each scored with the "
        "temperature and threshold that calibrate's rule fits on the other folds",
        at_least=2,
        at_most=100,
        nargs="?",
        const=5,
        metavar="K",
    )
    rule: str = operating_rule_option()
    target_sensitivity: float | None = target_sensitivity_option()
    ledger: str | None = option(
        None,
        "append one row per model to this CSV ledger of held-out reads (date, commit, weights sha256, recipe, "
        "metrics); the project's own is test_reads.csv",
        path=True,
        metavar="FILE",
    )
    record: bool = option(
        False, "also store the report in the bundle's metrics.json (under the split name) and model card"
    )
    progress: bool = quiet_option()


@dataclass
class CalibrateOptions:
    data: str = option(help="labelled images: dataset root (with --split) or a NORMAL/PNEUMONIA folder", path=True)
    out: str = option(help="folder for the recalibrated bundle (not the source bundle)", path=True)
    split: str | None = option(None, "split folder under --data to use (default: --data itself)")
    model: str | None = model_option()
    rule: str = operating_rule_option()
    target_sensitivity: float | None = target_sensitivity_option()
    n_resamples: int = bootstrap_option()
    progress: bool = quiet_option()


@dataclass
class AdaptOptions:
    data: str = option(
        help="folder of the site's own films (searched recursively; no labels read), at least 50 that the input "
        "gate accepts, a consecutive series rather than a selection",
        path=True,
    )
    out: str = option(help="folder for the adapted bundle (not the source bundle)", path=True)
    model: str | None = model_option()
    source_data: str | None = option(
        None,
        "the bundle's training data (a root with train/): a seeded sample of 200 of its films, labels unread, is "
        "what the site's films are aligned to (default: the training data the bundle records)",
        path=True,
        metavar="ROOT",
    )
    progress: bool = quiet_option("no progress bars")


@dataclass
class PredictOptions:
    paths: list[str] = option(
        help="image files, folders (searched recursively) or glob patterns", positional=True, nargs="+", metavar="PATH"
    )
    model: str | None = model_option()
    format: str | None = option(
        None,
        "output format (table when not given; with --output, the file's suffix decides and --format must agree)",
        choices=FORMATS,
    )
    engine: str = engine_option()
    int8: bool = int8_option()
    fp32: bool = fp32_option()
    gate: bool = option(
        True,
        "label every image, also those the input gate refuses as not a chest X-ray (each result says gate off "
        "and carries its gate score)",
        flag="--no-gate",
    )
    cam: str | None = option(None, "also write a Grad-CAM overlay PNG per image into DIR", path=True, metavar="DIR")
    sr: str | None = option(
        None,
        "also write a DICOM structured report (Comprehensive SR, TID 1500) per DICOM input into DIR, refusals "
        "included: the same report that listen --send-to sends",
        path=True,
        metavar="DIR",
    )
    output: str | None = option(
        None,
        "write results to FILE (.jsonl or .csv, by its suffix) as each one is made, instead of to stdout; a run "
        "killed midway loses nothing written",
        path=True,
        metavar="FILE",
    )
    resume: bool = option(False, "with --output: skip the inputs FILE already holds (by path) and append the rest")
    ray: str | None = option(
        None,
        "predict on a Ray cluster (pip install pneumoscan[ray]): its ADDRESS, 'auto' for the running one, or "
        "'local' to start one here; a pool of actors runs the classifier, results come back in order",
        metavar="ADDRESS",
    )
    batch_size: int = option(
        PREDICT_BATCH,
        "images per inference batch (larger batches take more memory, no less time)",
        at_least=1,
        at_most=4096,
    )
    progress: bool = quiet_option("no progress bar")


@dataclass
class TrainRunOptions:
    """``train``'s options besides the recipe's (:class:`recipe.TrainConfig`) and the augmentation's."""

    resume: str | None = option(
        None,
        "continue an interrupted run from its last checkpoint, with its own configuration",
        path=True,
        metavar="RUN_DIR",
    )
    progress: bool = quiet_option()


@dataclass
class ExportOptions:
    model: str | None = model_option()
    out: str | None = option(
        None,
        "FILE.onnx to write outside the bundle (when not given: into the bundle as model.onnx, where it is used)",
        path=True,
        metavar="FILE",
    )
    int8: bool = option(
        False,
        "also quantise to int8, calibrated on training images; without --out, int8 is then measured against "
        "fp32 on the bundle's validation films and recorded, and becomes the bundle's default engine where it "
        "answers as fp32 does (pneumoscan models says which and why)",
    )
    int8_only: bool = option(
        False,
        "with --int8 and no --out: put only the int8 model into the bundle (the fp32 export is then made on "
        "first use, into the cache), keeping the bundle small",
    )
    calibration_data: str | None = option(
        None,
        "dataset root whose train split calibrates int8 (its training patients) and, without --out, measures it "
        "(its validation patients) (default: the bundle's training data)",
        path=True,
    )
    calibration_images: int = option(
        1024, "training images (from the training patients) used to calibrate int8", at_least=2, at_most=100_000
    )


@dataclass
class ServeOptions:
    model: str | None = model_option()
    host: str = host_option()
    port: int = port_option(8000)
    engine: str = engine_option()
    int8: bool = int8_option()
    fp32: bool = fp32_option()
    max_upload_mb: float = option(
        20.0, "largest accepted upload in MB (at most the loader's 100 MB file limit)", above=0, at_most=100
    )
    body_timeout: float = option(30.0, "seconds an upload may stall before 408", above=0, at_most=3600)
    body_deadline: float = option(
        60.0,
        "seconds a whole request body may take, from its request head, before 408 (60: 20 MB at 2.8 Mbit/s)",
        above=0,
        at_most=3600,
    )
    header_timeout: float = option(
        10.0,
        "seconds a client has to send a complete request head (line and headers), counted from the connection "
        "or from the previous response; then the connection is closed",
        above=0,
        at_most=3600,
    )
    max_connections: int | None = option(
        None,
        "open connections at most (when not given: 1000, or fewer where the process may open fewer files); at "
        "the cap a new connection replaces the one that has waited longest for a request head",
        at_least=1,
        at_most=1_000_000,
    )
    max_per_client: int | None = option(
        None,
        "open connections one client address may hold; more are closed at once (when not given: a tenth of "
        "--max-connections; behind a reverse proxy every client has the proxy's address: raise it there)",
        at_least=1,
        at_most=1_000_000,
        flag="--max-client-connections",
    )
    workers: int | None = option(None, "inference threads (when not given: one per core)", at_least=1, at_most=256)
    cors_origins: list[str] | None = option(
        None,
        "allow cross-origin requests from ORIGIN (repeatable; when not given: CORS off)",
        repeat=True,
        flag="--cors",
        metavar="ORIGIN",
    )


@dataclass
class ListenOptions:
    model: str | None = model_option()
    ae_title: str = option("PNEUMOSCAN", "this node's AE title, which senders call")
    host: str = host_option()
    port: int = port_option(11112, "DICOM port")
    out: str = option("pneumoscan-listen", "folder for results.jsonl, appended to", path=True)
    send_to: str | None = option(
        None,
        "send a DICOM SR per image (the finding, or why the image was refused) to this node by C-STORE; or give "
        "a DICOMweb URL (http(s)://HOST/dicom-web) to send by STOW-RS",
        metavar="AETITLE@HOST:PORT",
    )
    send_cam: bool = option(
        False,
        "with --send-to: also send the Grad-CAM overlay as a Secondary Capture image in a new series of the "
        "image's study (slower: PyTorch runs the explanation)",
    )
    allow: list[str] | None = option(
        None,
        "calling AE title allowed to associate (repeatable); others are rejected. When not given: any, with a warning",
        repeat=True,
        metavar="AETITLE",
    )
    max_associations: int = option(8, "concurrent associations at most; more are rejected", at_least=1, at_most=1000)
    peer_associations: int = option(
        0,
        "concurrent associations one peer (calling AE title and address) may hold; more from it are rejected "
        "(0: half of --max-associations, at least 1)",
        at_least=0,
        at_most=1000,
    )
    send_timeout: float = option(
        10.0,
        "with --send-to: seconds each step may take (TCP connect, association, each DIMSE message, a STOW-RS request)",
        above=0,
        at_most=600,
    )
    stop_timeout: float = option(
        30.0,
        "on SIGTERM: seconds within which every acknowledged image has its results row (sent, or not and why)",
        above=0,
        at_most=3600,
    )
    idle_timeout: float = option(
        60.0,
        "seconds an association may go without a C-STORE before it is ended (C-ECHOs do not count)",
        above=0,
        at_most=3600,
    )
    engine: str = engine_option()
    int8: bool = int8_option()
    fp32: bool = fp32_option()


@dataclass
class EnsembleOptions:
    members: list[str] = option(
        help="the member bundles, 1 to 8; the first is the primary (its gate, subtype head and Grad-CAM)",
        positional=True,
        path=True,
        nargs="+",
        metavar="MEMBER_BUNDLE",
    )
    out: str = option(help="new (or empty) folder for the ensemble", path=True)
    data: str | None = option(
        None, "dataset root with train/ (default: the training data the primary member records)", path=True
    )
    names: str | None = option(
        None,
        "comma-separated member names, 1-32 of a-z 0-9 _ - each (default: from the folder names; "
        "the run's folder for RUN/model)",
    )
    name: str | None = option(None, "the ensemble's display name")
    engine: str = engine_option()
    n_resamples: int = bootstrap_option()
    progress: bool = quiet_option()


@dataclass
class ModelsOptions:
    """``pneumoscan models`` takes no options."""


@dataclass
class VerifyOptions:
    model: str | None = model_option()


@dataclass
class DemoOptions:
    out: str = option("pneumoscan-demo", "output folder", path=True)


COMMANDS = {
    "data check": DataCheckOptions,
    "data prepare": PrepareOptions,
    "evaluate": EvaluateOptions,
    "calibrate": CalibrateOptions,
    "adapt": AdaptOptions,
    "predict": PredictOptions,
    "export": ExportOptions,
    "serve": ServeOptions,
    "listen": ListenOptions,
    "verify": VerifyOptions,
    "ensemble": EnsembleOptions,
    "models": ModelsOptions,
    "demo": DemoOptions,
}  # train and heads fit declare theirs in the training layer (cli.main.options_of)
