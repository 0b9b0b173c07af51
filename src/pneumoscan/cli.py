"""The ``pneumoscan`` command: a thin layer over the Python API.

Exit codes: 0 all done; 1 some inputs failed (each named, the rest processed); 2 usage or
configuration error, always one line and never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from . import settings
from .errors import PneumoscanError
from .text import printable

MODEL_HELP = (
    "model bundle folder, or the name of a bundled model (pneumoscan models lists them; an existing path "
    "wins over a name); default: the bundled default model"
)


def _number(kind, low=None, high=None, low_open=False):
    """An argparse type: ``kind`` within [low, high] (``low_open``: strictly above low), or a usage error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}"
            ) from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'above' if low_open else 'at least'} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be at most {high}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_operating_rule(p, data: str) -> None:
    """How calibrate (and evaluate's cross-fitting, which applies calibrate's rule) set a threshold."""
    from .metrics import OPERATING_RULES

    p.add_argument(
        "--operating-rule",
        choices=OPERATING_RULES,
        default="youden",
        help=f"threshold rule fitted on {data}: 'youden' (default) maximises Youden's J; 'balanced' keeps "
        "probability 0.5 (logit 0) and fits the temperature alone",
    )
    p.add_argument(
        "--target-sensitivity",
        type=_number(float, 0, 1, low_open=True),
        default=None,
        help=f"threshold instead: the highest one whose sensitivity on {data} is at least this",
    )


def _add_bootstrap(p) -> None:
    p.add_argument(
        "--bootstrap",
        type=_number(int, 1, 100_000),
        default=2000,
        help="patient bootstrap resamples for the 95%% intervals (default 2000)",
    )


def _add_engine(p) -> None:
    from .inference import ENGINES

    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="auto (default): ONNX Runtime (the bundle's model or a cached export), else PyTorch; "
        'torch needs the train extra (pip install "pneumoscan[train]")',
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train(sub) -> None:
    from .data import Augmentation
    from .recipe import TrainConfig

    p = sub.add_parser(
        "train",
        help='train a classifier on a chest_xray folder (needs pip install "pneumoscan[train]")',
        description="Train on ROOT/train (validation carved from it by patient), keep the best "
        "weights by validation AUC, and write a run folder with the model bundle. --recipe picks a named "
        "preset (recorded in the bundle); any other flag given overrides the preset's value.",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        type=settings.path_argument,
        default=None,
        help="continue an interrupted run from its last checkpoint, with its own configuration",
    )
    settings.add_options(p, TrainConfig)
    settings.add_options(
        p.add_argument_group("augmentation (Keras ImageDataGenerator semantics, as the seed)"), Augmentation
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from .data import Augmentation
    from .errors import TRAINING_STACK, require_train_extra
    from .recipe import TrainConfig

    require_train_extra("pneumoscan train", TRAINING_STACK)
    from .training import train

    if args.resume:
        return _report_bundle(train(TrainConfig.from_run(args.resume, progress=not args.quiet)))
    chosen = settings.given(TrainConfig, args)
    cfg = TrainConfig.from_recipe(
        chosen.pop("recipe", "default"),
        **chosen,
        augmentation=settings.given(Augmentation, args),
        progress=not args.quiet,
    )
    return _report_bundle(train(cfg))


def _report_bundle(bundle) -> int:
    if bundle is not None:
        print(f"model bundle written to {printable(bundle.path)}")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="lay out the downloaded dataset, or check a dataset folder")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser(
        "check",
        help="counts, unreadable files, duplicates, patients across splits",
        description="Check a chest_xray folder: images per split and class, files that do "
        "not decode, byte-identical files, and patients found in several splits.",
    )
    check.add_argument(
        "root", type=settings.path_argument, help="dataset root (Kaggle layout, or a flat NORMAL/PNEUMONIA folder)"
    )
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(run=_run_data_check)
    prep = data_sub.add_parser(
        "prepare",
        help="lay the downloaded Kaggle/Mendeley archive out as ROOT/{train,val,test}/{NORMAL,PNEUMONIA}",
        description="Unpack the Kermany chest X-ray download (the Kaggle chest-xray-pneumonia zip, or Mendeley's "
        "ChestXRay2017.zip), or its unpacked folder, into the layout the other commands read. Run it again to "
        "finish an interrupted run: files already in place are skipped. Archive entries that are links, over "
        "the size limit, badly named or not images are refused and listed (exit 1); nothing is written "
        "outside ROOT.",
    )
    prep.add_argument("source", help="the downloaded zip, or the folder it was unpacked into")
    prep.add_argument("--out", required=True, metavar="ROOT", help="folder to write the layout into")
    prep.add_argument(
        "--size",
        type=_number(int, 32, 1024),
        default=None,
        metavar="N",
        help="write N x N grey JPEGs instead of the original files (aspect ratio squashed, as the model "
        "sees them; 224 is the shipped model's size and makes training read small files)",
    )
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(run=_run_data_prepare)


def _run_data_check(args) -> int:
    from .data import check_dataset

    report = check_dataset(args.root, progress=not args.quiet)
    print("\n".join(map(printable, report.lines())))
    return 1 if report.unreadable else 0


def _run_data_prepare(args) -> int:
    from .data_prepare import prepare_dataset

    report = prepare_dataset(args.source, args.out, size=args.size, progress=not args.quiet)
    for line in report.errors:
        print(f"pneumoscan: {printable(line)}", file=sys.stderr)
    print("\n".join(report.lines()))
    print(f"dataset in {printable(args.out)}; check it with: pneumoscan data check {printable(args.out)}")
    return 1 if report.errors else 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics, intervals, calibration, figures and report.html on a split",
        description="Evaluate one model, or compare two (--model A --model B), on a labelled split. "
        "Writes metrics.json, predictions.csv, figures and report.html to --out.",
    )
    p.add_argument(
        "--data",
        required=True,
        type=settings.path_argument,
        help="dataset root (Kaggle layout) or a flat NORMAL/PNEUMONIA folder",
    )
    p.add_argument("--split", default="test", help="split folder to evaluate (default test)")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        type=settings.path_argument,
        help=MODEL_HELP + "; give twice to compare two models",
    )
    p.add_argument(
        "--out", default="evaluation", type=settings.path_argument, help="output folder (default ./evaluation)"
    )
    _add_engine(p)
    _add_bootstrap(p)
    p.add_argument(
        "--seed", type=_number(int, 0, 2**32 - 1), default=0, help="seed of the bootstrap and of the random image grid"
    )
    p.add_argument(
        "--cross-fit",
        type=_number(int, 2, 100),
        nargs="?",
        const=5,
        default=None,
        metavar="K",
        help="also report cross-fitted local calibration: K patient folds (default 5), each scored with the "
        "temperature and threshold that calibrate's rule fits on the other folds",
    )
    _add_operating_rule(p, "the other folds (with --cross-fit)")
    p.add_argument(
        "--ledger",
        metavar="FILE",
        type=settings.path_argument,
        default=None,
        help="append one row per model to this CSV ledger of held-out reads (date, commit, weights sha256, "
        "recipe, metrics); the project's own is test_reads.csv",
    )
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
        args.data,
        args.split,
        args.model,
        args.out,
        engine=args.engine,
        n_resamples=args.bootstrap,
        seed=args.seed,
        progress=not args.quiet,
        record=args.record,
        cross_fit=args.cross_fit,
        ledger=args.ledger,
        rule=args.operating_rule,
        target_sensitivity=args.target_sensitivity,
    )
    for report in summary["models"]:
        print(metrics_table(report))
    if "comparison" in summary:
        c = summary["comparison"]
        print(
            f"AUC difference A - B ({printable(c['a'])} minus {printable(c['b'])}): {c['difference']:.4f} "
            f"(95% CI {c['ci95'][0]:.4f} to {c['ci95'][1]:.4f}), "
            f"p = {c['p_value']:.4g} ({c['method']})"
            if c["difference"] is not None
            else "AUC difference undefined"
        )
    print(f"report: {printable(summary['report'])}")
    return 1 if any(r["unreadable"] for r in summary["models"]) else 0


def _add_predict(sub) -> None:
    from .inference import PREDICT_BATCH
    from .output import FORMATS

    p = sub.add_parser(
        "predict",
        help="classify image files, folders or globs",
        description="Classify X-rays (JPEG, PNG, DICOM). Unreadable inputs are reported with their "
        "reason and the rest are still processed (exit code 1).",
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively) or glob patterns"
    )
    p.add_argument("--model", default=None, type=settings.path_argument, help=MODEL_HELP)
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="output format (default table; with --output, the file's suffix decides and --format must agree)",
    )
    _add_engine(p)
    p.add_argument("--int8", action="store_true", help="use the bundle's int8 ONNX model")
    p.add_argument(
        "--no-gate",
        action="store_true",
        help="label every image, also those the input gate refuses as not a chest X-ray "
        "(each result says gate off and carries its gate score)",
    )
    p.add_argument(
        "--cam",
        metavar="DIR",
        default=None,
        type=settings.path_argument,
        help="also write a Grad-CAM overlay PNG per image into DIR",
    )
    p.add_argument(
        "--sr",
        metavar="DIR",
        default=None,
        type=settings.path_argument,
        help="also write a DICOM structured report (Comprehensive SR, TID 1500) per DICOM input into DIR, "
        "refusals included: the same report that listen --send-to sends",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        type=settings.path_argument,
        default=None,
        help="write results to FILE (.jsonl or .csv, by its suffix) as each one is made, instead of to stdout; "
        "a run killed midway loses nothing written",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --output: skip the inputs FILE already holds (by path) and append the rest",
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        default=None,
        help="predict on a Ray cluster (pip install pneumoscan[ray]): its ADDRESS, 'auto' for the running one, "
        "or 'local' to start one here; a pool of actors runs the classifier, results come back in order",
    )
    p.add_argument(
        "--batch-size",
        type=_number(int, 1, 4096),
        default=PREDICT_BATCH,
        help=f"images per inference batch (default {PREDICT_BATCH}: larger batches take more memory, no less time)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_predict)


def _run_predict(args) -> int:
    from .inference import Classifier, Prediction, expand_inputs
    from .output import PredictionWriter, ResultsFile, ensure_folder, output_format, results_settings, write_cams

    if args.resume and not args.output:
        raise PneumoscanError("--resume goes with --output FILE")
    clf = Classifier.load(args.model, engine=args.engine, int8=args.int8, gate=not args.no_gate)
    for folder in (args.cam, args.sr):
        if folder:
            ensure_folder(folder)
    items = expand_inputs(args.paths)
    if args.ray:  # joined first: an unreachable cluster fails within seconds, before any file is touched
        from .distributed import connect

        connect(args.ray)
    fmt, todo, stream, results = args.format or "table", items, sys.stdout, None
    if args.output:
        fmt = output_format(Path(args.output))
        if args.format and args.format != fmt:
            raise PneumoscanError(
                f"--format {args.format} does not match --output {printable(args.output)} (written as {fmt}, by its "
                "suffix); leave out --format or change the suffix"
            )
        names = [str(x.path if isinstance(x, Prediction) else x) for x in items]
        results = ResultsFile(args.output, results_settings(clf, not args.no_gate), names, resume=args.resume)
        fmt, stream = results.fmt, results.stream
        todo = [x for x, done in zip(items, results.done) if not done]
    files = [x for x in todo if isinstance(x, Path)]
    writer = PredictionWriter(stream, fmt, header=not args.output)
    show_progress = not args.quiet and len(files) > 64 and sys.stderr.isatty()
    if args.ray:
        from .distributed import iter_predictions_ray

        predicted = iter_predictions_ray(
            files,
            address=args.ray,
            model=args.model,
            engine=args.engine,
            int8=args.int8,
            gate=not args.no_gate,
            batch_size=args.batch_size,
        )
    else:
        batches = clf.iter_predictions(files, args.batch_size, show_progress, total=len(files))
        predicted = (r for batch in batches for r in batch)
    explained, reported = [], []
    try:
        for item in todo:
            r = next(predicted) if isinstance(item, Path) else item
            writer.write(r)
            if r.ok:
                if args.cam:
                    explained.append(r)
            elif not (fmt == "table" and stream is sys.stdout):  # a table on the terminal shows its errors
                print(f"pneumoscan: {printable(r.path)}: {printable(r.error)}", file=sys.stderr)
            if args.sr and isinstance(item, Path):
                reported.append(r)
    finally:
        if results is not None:
            results.close()
    if fmt == "table" and not args.output:
        print(writer.summary())
    elif args.output:
        skipped = f", {len(items) - len(todo)} already in the file" if args.resume else ""
        print(f"{writer.summary()}{skipped}; results in {printable(args.output)}")
    if args.cam:
        write_cams(clf, explained, Path(args.cam))
    if args.sr:
        from .dicom_sr import ModelInfo, write_reports

        write_reports(reported, Path(args.sr), ModelInfo.of(clf.bundle))
    return 1 if writer.failed else 0


def _add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="refit threshold and temperature on labelled local images (new bundle)",
        description="Refit a bundle's temperature and operating threshold on labelled images from the site "
        "where it will run, and write a copy of the bundle with them (weights unchanged). The metrics it "
        "prints are in-sample: evaluate the new bundle on other images before relying on it.",
    )
    p.add_argument(
        "--data",
        required=True,
        type=settings.path_argument,
        help="labelled images: dataset root (with --split) or a NORMAL/PNEUMONIA folder",
    )
    p.add_argument("--split", default=None, help="split folder under --data to use (default: --data itself)")
    p.add_argument("--model", default=None, type=settings.path_argument, help=MODEL_HELP)
    p.add_argument(
        "--out",
        required=True,
        type=settings.path_argument,
        help="folder for the recalibrated bundle (not the source bundle)",
    )
    _add_operating_rule(p, "these images")
    _add_bootstrap(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_calibrate)


def _run_calibrate(args) -> int:
    from .calibrate import calibrate_bundle, small_set_warning
    from .evaluation import metrics_table

    bundle, report = calibrate_bundle(
        args.data,
        args.out,
        model=args.model,
        split=args.split,
        rule=args.operating_rule,
        target_sensitivity=args.target_sensitivity,
        n_resamples=args.bootstrap,
        progress=not args.quiet,
    )
    site = bundle.config["calibration"]
    print(
        f"threshold {site['source_threshold']:.4f} -> {bundle.threshold:.4f} ({bundle.config['threshold_rule']}), "
        f"temperature {site['source_temperature']:.4f} -> {bundle.temperature:.4f}"
    )
    print(metrics_table(report))
    for warning in report["warnings"]:
        print(f"pneumoscan: warning: {printable(warning)}", file=sys.stderr)
    if warning := small_set_warning(report):
        print(warning, file=sys.stderr)
    print(f"calibrated bundle written to {printable(bundle.path)} (metrics above are in-sample)")
    return 1 if report["unreadable"] else 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help='export a bundle to ONNX (fp32, or int8 with --int8; needs pip install "pneumoscan[train]")',
        description="Export the network to ONNX: uint8 grey images (N, 1, S, S) in, normalisation inside; "
        "logits and pooled features out (temperature, threshold and the heads stay in the bundle, so one "
        "export serves every calibration). Without --out the file goes into the bundle, recorded by its "
        "sha256, and predict uses ONNX Runtime by default.",
    )
    p.add_argument("--model", default=None, type=settings.path_argument, help=MODEL_HELP)
    p.add_argument(
        "--out",
        default=None,
        type=settings.path_argument,
        help="FILE.onnx to write outside the bundle (default: into the bundle as model.onnx, where it is used)",
    )
    p.add_argument("--int8", action="store_true", help="also quantise to int8, calibrated on training images")
    p.add_argument(
        "--int8-only",
        action="store_true",
        help="with --int8 and no --out: put only the int8 model into the bundle (the fp32 export is then made "
        "on first use, into the cache), keeping the bundle small",
    )
    p.add_argument(
        "--calibration-data",
        default=None,
        type=settings.path_argument,
        help="dataset root whose train split calibrates int8 (default: the bundle's training data)",
    )
    p.add_argument(
        "--calibration-images",
        type=_number(int, 2, 100_000),
        default=256,
        help="training images used to calibrate int8 (default 256)",
    )
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    import tempfile

    from .bundle import ONNX, ONNX_INT8, load_bundle
    from .errors import require_train_extra
    from .export import export_onnx, quantize_int8, training_images
    from .output import ensure_folder

    require_train_extra("pneumoscan export", ("torch", "timm", "torchvision"))
    bundle = load_bundle(args.model)
    if args.out and Path(args.out).resolve().parent == bundle.path.resolve():
        if Path(args.out).name != ONNX:  # a file of its own name in the bundle would never be used
            raise PneumoscanError(
                f"{printable(args.out)}: inside the bundle only {ONNX} is used (and {ONNX_INT8} with --int8); "
                "leave out --out to export into the bundle"
            )
        args.out = None  # the bundle's own model.onnx: written and recorded as without --out
    if args.out:
        if Path(args.out).is_dir():
            raise PneumoscanError(f"{printable(args.out)}: --out names a folder; give a FILE.onnx")
        ensure_folder(Path(args.out).parent)
    if args.int8_only and (args.out or not args.int8):
        raise PneumoscanError("--int8-only goes with --int8 and without --out")
    images = training_images(bundle, args.calibration_data, args.calibration_images) if args.int8 else None
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(bundle, Path(tmp) / "fp32.onnx" if args.int8_only else args.out)
        if not args.int8_only:
            print(f"ONNX fp32: {printable(fp32)}")
        if images is not None:
            out = Path(args.out).with_suffix(".int8.onnx") if args.out else None
            print(f"ONNX int8: {printable(quantize_int8(bundle, fp32, images, out))}")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the web service and page",
        description="Serve POST /v1/predict, GET /healthz, GET /v1/model and the page at GET /. "
        "Research software, not a medical device.",
    )
    p.add_argument("--model", default=None, type=settings.path_argument, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_number(int, 1, 65535), default=8000, help="port, 1-65535 (default 8000)")
    _add_engine(p)
    p.add_argument(
        "--max-upload-mb",
        type=_number(float, 0, 100, low_open=True),
        default=20,
        help="largest accepted upload in MB (default 20; at most the loader's 100 MB file limit)",
    )
    p.add_argument(
        "--body-timeout",
        type=_number(float, 0, 3600, low_open=True),
        default=30,
        help="seconds an upload may stall before 408 (default 30)",
    )
    p.add_argument(
        "--body-deadline",
        type=_number(float, 0, 3600, low_open=True),
        default=60,
        help="seconds a whole request body may take, from its request head, before 408 (default 60: "
        "20 MB at 2.8 Mbit/s)",
    )
    p.add_argument(
        "--header-timeout",
        type=_number(float, 0, 3600, low_open=True),
        default=10,
        help="seconds a client has to send a complete request head (line and headers), counted from the "
        "connection or from the previous response; then the connection is closed (default 10)",
    )
    p.add_argument(
        "--max-connections",
        type=_number(int, 1, 1_000_000),
        default=None,
        help="open connections at most (default 1000, or fewer where the process may open fewer files); at "
        "the cap a new connection replaces the one that has waited longest for a request head",
    )
    p.add_argument(
        "--max-client-connections",
        type=_number(int, 1, 1_000_000),
        default=None,
        help="open connections one client address may hold; more are closed at once (default a tenth of "
        "--max-connections; behind a reverse proxy every client has the proxy's address: raise it there)",
    )
    p.add_argument(
        "--workers", type=_number(int, 1, 256), default=None, help="inference threads (default: one per core)"
    )
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
        body_deadline=args.body_deadline,
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
        max_per_client=args.max_client_connections,
    )
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check a bundle's ONNX models against its weights (PyTorch) on reference X-rays",
        description="A bundle is as trusted as code: its digests prove only which files its author recorded. "
        "This runs PyTorch on the weights and ONNX Runtime on every ONNX model in the bundle (fp32, int8) "
        "over the bundled reference X-rays and checks that logits and features agree within a tolerance. "
        "Exit 0: all agree; 1: a model disagrees (do not use the bundle); 2: it cannot be checked.",
    )
    p.add_argument("--model", default=None, type=settings.path_argument, help=MODEL_HELP)
    p.set_defaults(run=_run_verify)


def _run_verify(args) -> int:
    from .verify import verify_bundle, verify_table

    checks = verify_bundle(args.model)
    if not checks:
        print("the bundle holds no ONNX model: nothing to compare (ONNX Runtime would run an export made here)")
        return 0
    print(verify_table(checks))
    failed = [c for c in checks if not c.ok]
    for c in failed:
        print(f"pneumoscan: {printable(c.path)}: does not compute what the weights compute", file=sys.stderr)
    return 1 if failed else 0


def _add_listen(sub) -> None:
    from .dicom_node import NodeLimits

    limits = NodeLimits()
    p = sub.add_parser(
        "listen",
        help="run a DICOM node that classifies the chest X-rays a PACS sends",
        description="A DICOM C-ECHO/C-STORE node. It accepts CR and DX (for presentation) images, uncompressed or "
        "JPEG/JPEG-LS/JPEG 2000/RLE compressed, classifies each with the input gate on, appends one JSON line per "
        "image to OUT/results.jsonl and, with --send-to, answers with a DICOM structured report in the image's study. "
        "Research software, not a medical device: send its answers to a research destination, never into a "
        "clinical worklist. Stops on SIGTERM or Ctrl-C after answering the images already received.",
    )
    p.add_argument("--model", default=None, type=settings.path_argument, help=MODEL_HELP)
    p.add_argument(
        "--ae-title", default="PNEUMOSCAN", help="this node's AE title, which senders call (default PNEUMOSCAN)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_number(int, 1, 65535), default=11112, help="DICOM port, 1-65535 (default 11112)")
    p.add_argument(
        "--out",
        default="pneumoscan-listen",
        type=settings.path_argument,
        help="folder for results.jsonl, appended to (default ./pneumoscan-listen)",
    )
    p.add_argument(
        "--send-to",
        metavar="AETITLE@HOST:PORT",
        default=None,
        help="send a DICOM SR per image (the finding, or why the image was refused) to this node by C-STORE; "
        "or give a DICOMweb URL (http(s)://HOST/dicom-web) to send by STOW-RS",
    )
    p.add_argument(
        "--send-cam",
        action="store_true",
        help="with --send-to: also send the Grad-CAM overlay as a Secondary Capture image in a new series of the "
        "image's study (slower: PyTorch runs the explanation)",
    )
    p.add_argument(
        "--allow",
        action="append",
        default=None,
        metavar="AETITLE",
        help="calling AE title allowed to associate (repeatable); others are rejected. Default: any, with a warning",
    )
    p.add_argument(
        "--max-associations",
        type=_number(int, 1, 1000),
        default=limits.max_associations,
        help=f"concurrent associations at most; more are rejected (default {limits.max_associations})",
    )
    _add_engine(p)
    p.add_argument("--int8", action="store_true", help="use the bundle's int8 ONNX model")
    p.set_defaults(run=_run_listen)


@contextlib.contextmanager
def _node_log():
    """While the node runs: one line on stderr per image and per refusal (pneumoscan's log); pynetdicom's own
    log only for what is fatal (the node logs the refusals that matter, without tracebacks)."""
    import logging

    class OneLine(logging.Formatter):
        """Peers name themselves (AE titles): their text is escaped; an exception is its type and message."""

        def format(self, record: logging.LogRecord) -> str:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += f" ({type(record.exc_info[1]).__name__}: {str(record.exc_info[1])[:200]})"
            return f"pneumoscan: {printable(text)}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine())
    ours, network = logging.getLogger("pneumoscan"), logging.getLogger("pynetdicom")
    levels = ours.level, network.level
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    network.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.setLevel(levels[0])
        network.setLevel(levels[1])


def _run_listen(args) -> int:
    import dataclasses

    from .dicom_node import DicomNode, NodeLimits, check_ae_title, destination
    from .inference import Classifier

    send_to = destination(args.send_to) if args.send_to else None
    if args.send_cam and not send_to:
        raise PneumoscanError("--send-cam goes with --send-to AETITLE@HOST:PORT")
    for title in (args.ae_title, *(args.allow or ())):
        check_ae_title(title)
    if not args.allow:
        print("pneumoscan: warning: any calling AE title may store images here; restrict with --allow", file=sys.stderr)
    limits = dataclasses.replace(NodeLimits(), max_associations=args.max_associations)
    clf = Classifier.load(args.model, engine=args.engine, int8=args.int8)
    node = DicomNode(
        clf,
        args.out,
        ae_title=args.ae_title,
        host=args.host,
        port=args.port,
        send_to=send_to,
        send_cam=args.send_cam,
        allow=args.allow,
        limits=limits,
    )
    with _node_log():
        node.serve_forever()
    c = node.counts
    print(
        f"{c['received']} received, {c['classified']} classified, {c['refused']} refused, {c['failed']} failed, "
        f"{c['sent']} reports sent, {c['send_failed']} not sent; results in {printable(node.results_path)}",
        file=sys.stderr,
    )
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the bundled model on bundled example X-rays and write a report",
        description="Classify the 16 bundled example X-rays (the official Kermany val split) with "
        "the bundled model; write report.html and Grad-CAM overlays.",
    )
    p.add_argument(
        "--out",
        default="pneumoscan-demo",
        type=settings.path_argument,
        help="output folder (default ./pneumoscan-demo)",
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo
    from .output import ensure_folder

    return run_demo(ensure_folder(args.out))


def _add_ensemble(sub) -> None:
    p = sub.add_parser(
        "ensemble",
        help="combine 1 to 4 bundles into one ensemble bundle (mean of calibrated logits)",
        description="Copy the member bundles into OUT/members/ and write an ensemble bundle: the combined logit "
        "is the mean of each member's logit divided by its temperature; the ensemble's own temperature is fitted "
        "on the validation images no member was trained on, threshold 0.5 (balanced). "
        "The first member is the primary: its features feed the input gate and the bacterial/viral head, and "
        "Grad-CAM explains it. Members must share the image size and may not be ensembles.",
    )
    p.add_argument("members", nargs="+", type=settings.path_argument, metavar="MEMBER_BUNDLE")
    p.add_argument("--out", required=True, type=settings.path_argument, help="new (or empty) folder for the ensemble")
    p.add_argument(
        "--data",
        default=None,
        type=settings.path_argument,
        help="dataset root with train/ (default: the training data the primary member records)",
    )
    p.add_argument(
        "--names",
        default=None,
        help="comma-separated member names, 1-32 of a-z 0-9 _ - each (default: from the folder names)",
    )
    p.add_argument("--name", default=None, help="the ensemble's display name")
    _add_engine(p)
    _add_bootstrap(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_ensemble)


def _run_ensemble(args) -> int:
    from .ensemble import make_ensemble
    from .evaluation import metrics_table

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    bundle = make_ensemble(
        args.members,
        args.out,
        names=names,
        data=args.data,
        name=args.name,
        engine=args.engine,
        n_resamples=args.bootstrap,
        progress=not args.quiet,
    )
    report = {**bundle.metrics["validation"], "model": {"name": bundle.name}}
    print(metrics_table(report))
    print(f"temperature {bundle.temperature:.4f}, threshold {bundle.threshold:.4f} ({bundle.config['threshold_rule']})")
    print(f"ensemble bundle written to {printable(bundle.path)}")
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list the bundled models that --model NAME accepts",
        description="The models shipped inside the package, by the name --model accepts: their folder, "
        "size and the accuracy their metrics record (test where recorded, else validation).",
    )
    p.set_defaults(run=_run_models)


def _run_models(args) -> int:
    from .ensemble import bundled_models_table

    print(bundled_models_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="pneumoscan",
        description="Pneumonia detection on chest X-rays: "
        "train, evaluate, explain and serve a transfer-learning classifier.",
    )
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = (
        _add_train,
        _add_evaluate,
        _add_calibrate,
        _add_predict,
        _add_export,
        _add_serve,
        _add_listen,
        _add_verify,
        _add_ensemble,
        _add_models,
        _add_demo,
    )
    for add in (*commands, _add_data):
        add(sub)
    return parser


def quiet_libraries() -> None:
    """For this process only (an application's choice, never made on import): the libraries' own warnings
    (pydicom's malformed tags, Pillow's EXIF notes, deprecations inside torch and Lightning) are not the
    user's to act on; pneumoscan's own warnings are shown, one line each."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"pneumoscan(\.|$)")


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"pneumoscan: warning: {printable(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # names that are not UTF-8 never stop the output
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    warnings.showwarning = _one_line_warnings
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except PneumoscanError as exc:
        print(f"pneumoscan: error: {printable(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output that cannot be written, a disk that is full
        where = f"{printable(exc.filename)}: " if exc.filename else ""
        print(f"pneumoscan: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pneumoscan: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - never a traceback; PNEUMOSCAN_DEBUG=1 shows it
        if os.environ.get("PNEUMOSCAN_DEBUG"):
            raise
        detail = printable(str(exc).splitlines()[0][:200]) if str(exc) else ""
        print(
            f"pneumoscan: error: unexpected {type(exc).__name__}: {detail} (set PNEUMOSCAN_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
