"""The ``pneumoscan`` command: a thin layer over the Python API.

Exit codes: 0 all done; 1 some inputs failed (each named, the rest processed); 2 usage or
configuration error, always one line and never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import PneumoscanError

MODEL_HELP = "model bundle folder (default: the bundled model)"


def _add_operating_rule(p, data: str) -> None:
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        help=f"threshold: the highest one whose sensitivity on {data} is at least this, instead of Youden's J",
    )


def _add_bootstrap(p) -> None:
    p.add_argument(
        "--bootstrap", type=int, default=2000, help="patient bootstrap resamples for the 95%% intervals (2000)"
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a classifier on a chest_xray folder",
        description="Train on ROOT/train (validation carved from it by patient), keep the best "
        "weights by validation AUC, and write a run folder with the model bundle.",
    )
    p.add_argument("--data", help="dataset root with train/{NORMAL,PNEUMONIA} (Kaggle layout)")
    p.add_argument("--out", help="run folder to write (config, history, curves, checkpoints, model/)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue an interrupted run from its last checkpoint, with its own configuration",
    )
    p.add_argument("--backbone", default="efficientnet_lite0", help="efficientnet_lite0 (default) or mobilenet_v2")
    p.add_argument(
        "--weights",
        default="imagenet",
        help="'imagenet' (bundled for efficientnet_lite0, downloaded for mobilenet_v2 where online) "
        "or a torchvision/timm checkpoint FILE",
    )
    p.add_argument("--image-size", type=int, default=224, help="square input size in pixels (default 224)")
    p.add_argument("--epochs", type=int, default=10, help="frozen-backbone epochs, phase 1 (default 10)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch and device (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of phase 1 (default 1e-3)")
    p.add_argument("--patience", type=int, default=5, help="epochs without a better validation AUC before stopping (5)")
    p.add_argument(
        "--fine-tune-epochs", type=int, default=0, help="phase 2 epochs with the last blocks unfrozen (0: none)"
    )
    p.add_argument(
        "--unfreeze", type=int, default=6, help="blocks unfrozen in phase 2, counted from the top (default 6)"
    )
    p.add_argument("--fine-tune-lr", type=float, default=1e-5, help="Adam learning rate of phase 2 (default 1e-5)")
    p.add_argument(
        "--schedule",
        choices=("constant", "onecycle"),
        default="constant",
        help="phase 2 learning-rate schedule (default constant)",
    )
    p.add_argument(
        "--class-weights",
        choices=("balanced", "none"),
        default="balanced",
        help="weight the loss so both classes count equally (default balanced)",
    )
    p.add_argument("--label-smoothing", type=float, default=0.0, help="pull training targets towards 0.5 by this much")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout before the last dense layer (default 0.2)")
    p.add_argument(
        "--val-source",
        choices=("patients", "official"),
        default="patients",
        help="'patients': carve validation from train by patient (default); 'official': the 16-image val split",
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of patients per class held out (default 0.1)")
    _add_operating_rule(p, "validation")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation, order and augmentation")
    p.add_argument("--devices", type=int, default=1, help="processes/devices; 2+ runs DDP (gloo on CPU)")
    p.add_argument(
        "--workers", type=int, default=0, help="data-loader worker processes (default 0: images are in memory)"
    )
    p.add_argument(
        "--cache",
        choices=("auto", "memory", "disk"),
        default="auto",
        help="keep decoded training images in memory, or stream them from disk with loader workers "
        "(default auto: memory when they take at most a quarter of RAM)",
    )
    p.add_argument("--limit", type=int, default=None, help="use at most N training images per class (quick runs)")
    aug = p.add_argument_group("augmentation (Keras ImageDataGenerator semantics, as the seed)")
    aug.add_argument("--rotation", type=float, default=20.0, help="max rotation in degrees (20)")
    aug.add_argument("--shift", type=float, default=0.1, help="max width/height shift as a fraction (0.1)")
    aug.add_argument("--shear", type=float, default=0.1, help="max shear in degrees (0.1, as Keras reads it)")
    aug.add_argument("--zoom", type=float, default=0.1, help="zoom range: scale in [1-z, 1+z] (0.1)")
    aug.add_argument("--no-hflip", action="store_true", help="turn off random horizontal flips")
    aug.add_argument("--brightness", type=float, default=0.0, help="brightness jitter fraction (0: off)")
    aug.add_argument("--contrast", type=float, default=0.0, help="contrast jitter fraction (0: off)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from .data import Augmentation
    from .errors import ConfigError
    from .training import TrainConfig, train

    if args.resume:
        return _report_bundle(train(TrainConfig.from_run(args.resume, progress=not args.quiet)))
    if not args.data or not args.out:
        raise ConfigError("train needs --data ROOT and --out RUN_DIR (or --resume RUN_DIR)")

    augmentation = Augmentation(
        rotation=args.rotation,
        shift=args.shift,
        shear=args.shear,
        zoom=args.zoom,
        hflip=not args.no_hflip,
        brightness=args.brightness,
        contrast=args.contrast,
    )
    cfg = TrainConfig(
        data=args.data,
        out=args.out,
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        fine_tune_epochs=args.fine_tune_epochs,
        unfreeze=args.unfreeze,
        fine_tune_lr=args.fine_tune_lr,
        schedule=args.schedule,
        class_weights=args.class_weights,
        label_smoothing=args.label_smoothing,
        dropout=args.dropout,
        val_source=args.val_source,
        val_fraction=args.val_fraction,
        seed=args.seed,
        devices=args.devices,
        workers=args.workers,
        cache=args.cache,
        limit=args.limit,
        target_sensitivity=args.target_sensitivity,
        augmentation=augmentation,
        progress=not args.quiet,
    )
    return _report_bundle(train(cfg))


def _report_bundle(bundle) -> int:
    if bundle is not None:
        print(f"model bundle written to {bundle.path}")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="inspect a dataset folder")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser(
        "check",
        help="counts, unreadable files, duplicates, patients across splits",
        description="Check a chest_xray folder: images per split and class, files that do "
        "not decode, byte-identical files, and patients found in several splits.",
    )
    check.add_argument("root", help="dataset root (Kaggle layout, or a flat NORMAL/PNEUMONIA folder)")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(run=_run_data_check)


def _run_data_check(args) -> int:
    from .data import check_dataset

    report = check_dataset(args.root, progress=not args.quiet)
    print("\n".join(report.lines()))
    return 1 if report.unreadable else 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics, intervals, calibration, figures and report.html on a split",
        description="Evaluate one model, or compare two (--model A --model B), on a labelled split. "
        "Writes metrics.json, predictions.csv, figures and report.html to --out.",
    )
    p.add_argument("--data", required=True, help="dataset root (Kaggle layout) or a flat NORMAL/PNEUMONIA folder")
    p.add_argument("--split", default="test", help="split folder to evaluate (default test)")
    p.add_argument("--model", action="append", default=None, help=MODEL_HELP + "; give twice to compare two models")
    p.add_argument("--out", default="evaluation", help="output folder (default ./evaluation)")
    p.add_argument(
        "--engine",
        choices=("auto", "onnx", "torch"),
        default="auto",
        help="auto: ONNX Runtime when the bundle has model.onnx, else PyTorch",
    )
    _add_bootstrap(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the random image grid")
    p.add_argument(
        "--record",
        action="store_true",
        help="also store the report in the bundle's metrics.json (under the split name) and model card",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    from .errors import ConfigError
    from .evaluation import evaluate, metrics_table

    if args.model and len(args.model) > 2:
        raise ConfigError("--model may be given at most twice")
    summary = evaluate(
        args.data, args.split, args.model, args.out, args.engine, args.bootstrap, args.seed, not args.quiet, args.record
    )
    for report in summary["models"]:
        print(metrics_table(report))
    if "comparison" in summary:
        c = summary["comparison"]
        print(
            f"AUC difference A-B: {c['difference']:.4f} (95% CI {c['ci95'][0]:.4f} to {c['ci95'][1]:.4f}), "
            f"p = {c['p_value']:.4g} ({c['method']})"
            if c["difference"] is not None
            else "AUC difference undefined"
        )
    print(f"report: {summary['report']}")
    return 1 if any(r["unreadable"] for r in summary["models"]) else 0


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="classify image files, folders or globs",
        description="Classify X-rays (JPEG, PNG, DICOM). Unreadable inputs are reported with their "
        "reason and the rest are still processed (exit code 1).",
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or glob patterns"
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--format", choices=("table", "csv", "jsonl"), default="table", help="output format (default table)")
    p.add_argument(
        "--engine",
        choices=("auto", "onnx", "torch"),
        default="auto",
        help="auto: ONNX Runtime when the bundle has model.onnx, else PyTorch",
    )
    p.add_argument("--int8", action="store_true", help="use the bundle's int8 ONNX model")
    p.add_argument("--cam", metavar="DIR", default=None, help="also write a Grad-CAM overlay PNG per image into DIR")
    p.add_argument("--batch-size", type=int, default=32, help="images per inference batch (default 32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_predict)


def _run_predict(args) -> int:
    from .inference import Classifier, expand_inputs
    from .output import write_cams, write_predictions

    items = expand_inputs(args.paths)
    clf = Classifier.load(args.model, engine=args.engine, int8=args.int8)
    files = [x for x in items if isinstance(x, Path)]
    show_progress = not args.quiet and len(files) > 64 and sys.stderr.isatty()
    predicted = iter(clf.predict(files, batch_size=args.batch_size, progress=show_progress))
    results = [next(predicted) if isinstance(x, Path) else x for x in items]
    write_predictions(results, args.format, sys.stdout)
    if args.cam:
        write_cams(clf, results, Path(args.cam))
    for r in results:
        if not r.ok:
            print(f"pneumoscan: {r.path}: {r.error}", file=sys.stderr)
    return 1 if any(not r.ok for r in results) else 0


def _add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="refit threshold and temperature on labelled local images (new bundle)",
        description="Refit a bundle's temperature and operating threshold on labelled images from the site "
        "where it will run, and write a copy of the bundle with them (weights unchanged). The metrics it "
        "prints are in-sample: evaluate the new bundle on other images before relying on it.",
    )
    p.add_argument(
        "--data", required=True, help="labelled images: dataset root (with --split) or a NORMAL/PNEUMONIA folder"
    )
    p.add_argument("--split", default=None, help="split folder under --data to use (default: --data itself)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for the recalibrated bundle (not the source bundle)")
    _add_operating_rule(p, "these images")
    _add_bootstrap(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_calibrate)


def _run_calibrate(args) -> int:
    from .calibrate import calibrate_bundle, small_set_warning
    from .evaluation import metrics_table

    bundle, report = calibrate_bundle(
        args.data, args.out, args.model, args.split, args.target_sensitivity, args.bootstrap, progress=not args.quiet
    )
    site = bundle.config["calibration"]
    print(
        f"threshold {site['source_threshold']:.4f} -> {bundle.threshold:.4f} ({bundle.config['threshold_rule']}), "
        f"temperature {site['source_temperature']:.4f} -> {bundle.temperature:.4f}"
    )
    print(metrics_table(report))
    if warning := small_set_warning(report):
        print(warning, file=sys.stderr)
    print(f"calibrated bundle written to {bundle.path} (metrics above are in-sample)")
    return 1 if report["unreadable"] else 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a bundle to ONNX (fp32, or int8 with --int8)",
        description="Export the whole model (normalisation and sigmoid included) to ONNX. Without "
        "--out the file goes into the bundle, so predict uses ONNX Runtime by default.",
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--out", default=None, help="FILE.onnx to write (default: inside the bundle)")
    p.add_argument("--int8", action="store_true", help="also quantise to int8, calibrated on training images")
    p.add_argument(
        "--calibration-data",
        default=None,
        help="dataset root whose train split calibrates int8 (default: the bundle's training data)",
    )
    p.add_argument("--calibration-images", type=int, default=256, help="training images used to calibrate int8 (256)")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from .bundle import load_bundle
    from .export import export_onnx, quantize_int8, training_images

    bundle = load_bundle(args.model)
    fp32 = export_onnx(bundle, args.out)
    print(f"ONNX fp32: {fp32}")
    if args.int8:
        images = training_images(bundle, args.calibration_data, args.calibration_images)
        out = Path(args.out).with_suffix(".int8.onnx") if args.out else None
        print(f"ONNX int8: {quantize_int8(bundle, fp32, images, out)}")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the web service and page",
        description="Serve POST /v1/predict, GET /healthz, GET /v1/model and the page at GET /. "
        "Research software, not a medical device.",
    )
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--engine", choices=("auto", "onnx", "torch"), default="auto", help="inference engine (default auto)"
    )
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest accepted upload in MB (default 20)")
    p.add_argument("--body-timeout", type=float, default=30, help="seconds an upload may stall before 408 (default 30)")
    p.add_argument("--workers", type=int, default=None, help="inference threads (default: one per core)")
    p.add_argument(
        "--cors",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="allow cross-origin requests from ORIGIN (repeatable; default: CORS off)",
    )
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    from .service import serve

    serve(
        args.model,
        args.host,
        args.port,
        engine=args.engine,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        workers=args.workers,
        cors_origins=args.cors,
        body_timeout=args.body_timeout,
    )
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the bundled model on bundled example X-rays and write a report",
        description="Classify the 16 bundled example X-rays (the official Kermany val split) with "
        "the bundled model; write report.html and Grad-CAM overlays.",
    )
    p.add_argument("--out", default="pneumoscan-demo", help="output folder (default ./pneumoscan-demo)")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="pneumoscan",
        description="Pneumonia detection on chest X-rays: "
        "train, evaluate, explain and serve a transfer-learning classifier.",
    )
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_evaluate, _add_calibrate, _add_predict, _add_export, _add_serve, _add_demo, _add_data):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except PneumoscanError as exc:
        print(f"pneumoscan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pneumoscan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
