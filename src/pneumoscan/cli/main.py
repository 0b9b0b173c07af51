"""The ``pneumoscan`` command: a thin layer over the Python API.

Exit codes: 0 all done; 1 some inputs failed (each named, the rest processed); 2 usage or
configuration error, always one line and never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from pneumoscan.core import settings
from pneumoscan.core.errors import PneumoscanError
from pneumoscan.core.options import (
    COMMANDS,
    AdaptOptions,
    CalibrateOptions,
    DataCheckOptions,
    DemoOptions,
    EnsembleOptions,
    EvaluateOptions,
    ExportOptions,
    ListenOptions,
    PredictOptions,
    PrepareOptions,
    ServeOptions,
    TrainRunOptions,
    VerifyOptions,
)
from pneumoscan.core.text import printable


def _options(cls, args: argparse.Namespace):
    """A command's options from its parsed arguments (declared defaults for the others), checked."""
    options = settings.from_args(cls, args)
    settings.check(options)
    return options


_COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {}  # name: (help, run)
_GROUPS = {
    "data": "lay out the downloaded dataset, or check a dataset folder",
    "heads": "fit a bundle's feature heads (input gate, bacterial/viral head)",
}


def command(name: str, help: str):
    """Make the decorated function the command ``name`` ("data check": ``check`` under ``data``). Its options
    are :func:`options_of`, its ``--help`` description its docstring."""

    def register(run: Callable[[argparse.Namespace], int]):
        _COMMANDS[name] = (help, run)
        return run

    return register


def options_of(name: str) -> tuple[type, ...]:
    """The options classes of command ``name``: ``options.COMMANDS[name]``, or for the two commands that
    declare theirs in the training layer (beside the recipe and the heads they name) those."""
    if name == "train":
        from pneumoscan.training.augment import Augmentation
        from pneumoscan.training.recipe import TrainConfig

        return TrainRunOptions, TrainConfig, Augmentation
    if name == "heads fit":
        from pneumoscan.training.heads import HeadsFitOptions

        return (HeadsFitOptions,)
    return (COMMANDS[name],)


def _add_options(parser: argparse.ArgumentParser, name: str) -> None:
    *classes, last = options_of(name)
    for cls in classes:
        settings.add_options(parser, cls)
    if name == "train":
        parser = parser.add_argument_group("augmentation (Keras ImageDataGenerator semantics, as the seed)")
    settings.add_options(parser, last)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@command("demo", help="run the bundled model on bundled example X-rays and write a report")
def _run_demo(args) -> int:
    """Classify the 16 bundled example X-rays (the official Kermany val split) with the bundled model; write
    report.html and Grad-CAM overlays."""
    from pneumoscan.cli.demo import run_demo
    from pneumoscan.io.fileio import ensure_folder

    return run_demo(ensure_folder(_options(DemoOptions, args).out))


@command("train", help='train a classifier on a chest_xray folder (needs pip install "pneumoscan[train]")')
def _run_train(args) -> int:
    """Train on ROOT/train (validation carved from it by patient), keep the best weights by validation AUC, and write a
    run folder with the model bundle. --recipe picks a named preset (recorded in the bundle); any other flag given
    overrides the preset's value."""
    from pneumoscan.core.errors import TRAINING_STACK, require_train_extra
    from pneumoscan.training.augment import Augmentation
    from pneumoscan.training.recipe import TrainConfig

    require_train_extra("pneumoscan train", TRAINING_STACK)
    from pneumoscan.training.trainer import train

    run = _options(TrainRunOptions, args)
    if run.resume:
        return _report_bundle(train(TrainConfig.from_run(run.resume, progress=run.progress)))
    chosen = settings.given(TrainConfig, args)
    cfg = TrainConfig.from_recipe(
        chosen.pop("recipe", "default"),
        **chosen,
        augmentation=settings.given(Augmentation, args),
        progress=run.progress,
    )
    return _report_bundle(train(cfg))


def _report_bundle(bundle) -> int:
    if bundle is not None:
        print(f"model bundle written to {printable(bundle.path)}")
    return 0


@command("data check", help="counts, unreadable files, duplicates, patients across splits")
def _run_data_check(args) -> int:
    """Check a chest_xray folder: images per split and class, files that do not decode, byte-identical files, and
    patients found in several splits."""
    from pneumoscan.io.dataset import check_dataset

    report = check_dataset(**settings.given(DataCheckOptions, args))
    print("\n".join(map(printable, report.lines())))
    return 1 if report.unreadable else 0


@command(
    "data prepare",
    help="lay the downloaded Kaggle/Mendeley archive out as ROOT/{train,val,test}/{NORMAL,PNEUMONIA}",
)
def _run_data_prepare(args) -> int:
    """Unpack the Kermany chest X-ray download (the Kaggle chest-xray-pneumonia zip, or Mendeley's ChestXRay2017.zip),
    or its unpacked folder, into the layout the other commands read. Run it again to finish an interrupted run:
    files already in place are skipped. Archive entries that are links, over the size limit, badly named or not
    images are refused and listed (exit 1); nothing is written outside ROOT. Entries must decode as the format their
    names say; two different images that would become one file both stay (the later as stem~HASH.ext), and the
    report lists them. An archive that unpacks to more than --max-total-gb, or is compressed like no set of images,
    is refused whole (exit 2) and nothing is left behind."""
    from pneumoscan.io.prepare import prepare_dataset

    report = prepare_dataset(**settings.given(PrepareOptions, args))
    for line in report.errors:
        print(f"pneumoscan: {printable(line)}", file=sys.stderr)
    print("\n".join(map(printable, report.lines())))
    print(f"dataset in {printable(args.out)}; check it with: pneumoscan data check {printable(args.out)}")
    return 1 if report.errors else 0


@command("evaluate", help="metrics, intervals, calibration, figures and report.html on a split")
def _run_evaluate(args) -> int:
    """Evaluate one model, or compare two (--model A --model B), on a labelled split. Writes metrics.json,
    predictions.csv, figures and report.html to --out."""
    from pneumoscan.evaluation.evaluate import evaluate, metrics_table

    summary = evaluate(**settings.given(EvaluateOptions, args))
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


@command("predict", help="classify image files, folders or globs")
def _run_predict(args) -> int:
    """Classify X-rays (JPEG, PNG, DICOM). Unreadable inputs are reported with their reason and the rest are still
    processed (exit code 1)."""
    o = _options(PredictOptions, args)
    from pneumoscan.inference.classifier import Classifier
    from pneumoscan.inference.inputs import expand_inputs
    from pneumoscan.inference.output import PredictionWriter, ResultsFile, output_format, results_settings, write_cams
    from pneumoscan.inference.result import Prediction
    from pneumoscan.io.fileio import ensure_folder

    if o.resume and not o.output:
        raise PneumoscanError("--resume goes with --output FILE")
    clf = Classifier.load(o.model, engine=o.engine, int8=o.int8, fp32=o.fp32, gate=o.gate)
    for folder in (o.cam, o.sr):
        if folder:
            ensure_folder(folder)
    items = expand_inputs(o.paths)
    if o.ray:  # joined first: an unreachable cluster fails within seconds, before any file is touched
        from pneumoscan.inference.distributed import connect

        connect(o.ray)
    fmt, todo, stream, results = o.format or "table", items, sys.stdout, None
    if o.output:
        fmt = output_format(Path(o.output))
        if o.format and o.format != fmt:
            raise PneumoscanError(
                f"--format {o.format} does not match --output {printable(o.output)} (written as {fmt}, by its "
                "suffix); leave out --format or change the suffix"
            )
        names = [str(x.path if isinstance(x, Prediction) else x) for x in items]
        results = ResultsFile(o.output, results_settings(clf, o.gate), names, resume=o.resume)
        fmt, stream = results.fmt, results.stream
        todo = [x for x, done in zip(items, results.done) if not done]
    files = [x for x in todo if isinstance(x, Path)]
    writer = PredictionWriter(stream, fmt, header=not o.output)
    show_progress = o.progress and len(files) > 64 and sys.stderr.isatty()
    if o.ray:
        from pneumoscan.inference.distributed import iter_predictions_ray

        predicted = iter_predictions_ray(
            files,
            address=o.ray,
            model=o.model,
            engine=o.engine,
            int8=o.int8,
            fp32=o.fp32,
            gate=o.gate,
            batch_size=o.batch_size,
        )
    else:
        batches = clf.iter_predictions(files, o.batch_size, show_progress, total=len(files))
        predicted = (r for batch in batches for r in batch)
    explained, reported = [], []
    try:
        for item in todo:
            r = next(predicted) if isinstance(item, Path) else item
            writer.write(r)
            if r.ok:
                if o.cam:
                    explained.append(r)
            elif not (fmt == "table" and stream is sys.stdout):  # a table on the terminal shows its errors
                print(f"pneumoscan: {printable(r.path)}: {printable(r.error)}", file=sys.stderr)
            if o.sr and isinstance(item, Path):
                reported.append(r)
    finally:
        if results is not None:
            results.close()
    if fmt == "table" and not o.output:
        print(writer.summary())
    elif o.output:
        skipped = f", {len(items) - len(todo)} already in the file" if o.resume else ""
        print(f"{writer.summary()}{skipped}; results in {printable(o.output)}")
    if o.cam:
        write_cams(clf, explained, Path(o.cam))
    if o.sr:
        from pneumoscan.io.dicom_sr import ModelInfo, write_reports

        write_reports(reported, Path(o.sr), ModelInfo.of(clf.bundle))
    return 1 if writer.failed else 0


@command("calibrate", help="refit temperature (and threshold) on labelled local images (new bundle)")
def _run_calibrate(args) -> int:
    """Refit a bundle's temperature, and with --operating-rule youden or --target-sensitivity its operating threshold,
    on labelled images from the site where it will run, and write a copy of the bundle with them (weights
    unchanged). The metrics it prints are in-sample: evaluate the new bundle on other images before relying on it."""
    from pneumoscan.evaluation.evaluate import metrics_table
    from pneumoscan.training.calibrate import calibrate_bundle, small_set_warning

    given = settings.given(CalibrateOptions, args)
    bundle, report = calibrate_bundle(given.pop("data"), given.pop("out"), **given)
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


@command("adapt", help="re-estimate a bundle's batch-norm statistics on a site's unlabelled films (new bundle)")
def _run_adapt(args) -> int:
    """Adapt a bundle to a site's scanner without labels (AdaBN): the films under --data, prepared as predict
    prepares them and accepted by the bundle's input gate, re-estimate the network's batch-norm statistics
    (aligned to the training hospital's films, --source-data); every weight is unchanged. The new bundle, with
    fp32 and int8 ONNX models, works like any other (predict, serve, listen, verify). Its threshold and
    temperature are the source's, no longer validated: calibrate it on labelled local films before relying on
    it. The bacterial/viral head is dropped. See docs/adapt.md."""
    from pneumoscan.training.adapt import adapt_bundle, gate_warnings

    given = settings.given(AdaptOptions, args)
    bundle, record = adapt_bundle(given.pop("data"), given.pop("out"), **given)
    print(
        f"adapted on {record['films']} films of {printable(record['data'])} ({record['refused_by_gate']} refused by "
        f"the input gate, {record['unreadable']} unreadable); called PNEUMONIA: "
        f"{record['pneumonia_share_source']:.0%} by the source, {record['pneumonia_share_adapted']:.0%} adapted"
    )
    for warning in gate_warnings(record):
        print(f"pneumoscan: warning: {printable(warning)}", file=sys.stderr)
    print(
        f"adapted bundle written to {printable(bundle.path)}; its threshold and temperature are not validated on "
        "it: pneumoscan calibrate on labelled local films"
    )
    return 0


@command("export", help='export a bundle to ONNX (fp32, or int8 with --int8; needs pip install "pneumoscan[train]")')
def _run_export(args) -> int:
    """Export the network to ONNX: uint8 grey images (N, 1, S, S) in, normalisation inside; logits and pooled features
    out (temperature, threshold and the heads stay in the bundle, so one export serves every calibration). Without
    --out the file goes into the bundle, recorded by its sha256, and predict uses ONNX Runtime by default."""
    from pneumoscan.training.export import export_bundle

    for kind, path in export_bundle(**settings.given(ExportOptions, args)):
        print(f"ONNX {kind}: {printable(path)}")
    return 0


@command("serve", help="run the web service and page")
def _run_serve(args) -> int:
    """Serve POST /v1/predict, GET /healthz, GET /v1/model and the page at GET /. Research software, not a medical
    device."""
    from pneumoscan.serving.service import serve

    serve(**settings.given(ServeOptions, args))
    return 0


@command(
    "heads fit",
    help='fit the input gate and the bacterial/viral head onto an existing bundle (needs "pneumoscan[train]")',
)
def _run_heads_fit(args) -> int:
    """Fit the feature heads onto a bundle trained before they existed, exactly as train fits them: on the bundle's
    training images and validation patients (its recipe's split of ROOT; the test split is not opened). The weights
    are untouched; the heads' sha256 go into config.json and the model card is regenerated."""
    from pneumoscan.training.heads import HeadsFitOptions, fit_heads

    given = settings.given(HeadsFitOptions, args)
    bundle, lines = fit_heads(given.pop("model"), given.pop("data"), **given)
    print("\n".join(lines))
    print(f"heads written to {printable(bundle.path)}")
    return 0


@command(
    "verify", help="check a bundle's ONNX models against graphs rebuilt from its weights and against PyTorch on X-rays"
)
def _run_verify(args) -> int:
    """A bundle is as trusted as code: its digests prove only which files its author recorded. This rebuilds every
    ONNX model in the bundle (fp32, int8) from the weights and compares the graphs, then runs PyTorch on the weights
    and ONNX Runtime on each model over the bundled reference X-rays and probe images made from a fresh seed, and
    checks that logits and features agree within a tolerance. Exit 0: all agree; 1: a model differs (do not use
    the bundle); 2: it cannot be checked."""
    from pneumoscan.evaluation.verify import verify_bundle, verify_table

    checks = verify_bundle(**settings.given(VerifyOptions, args))
    if not checks:
        print("the bundle holds no ONNX model: nothing to compare (ONNX Runtime would run an export made here)")
        return 0
    print(verify_table(checks))
    failed = [c for c in checks if not c.ok]
    for c in failed:
        reasons = printable("; ".join(c.problems))
        print(f"pneumoscan: {printable(c.path)}: does not compute what the weights compute: {reasons}", file=sys.stderr)
    return 1 if failed else 0


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


@command("listen", help="run a DICOM node that classifies the chest X-rays a PACS sends")
def _run_listen(args) -> int:
    """A DICOM C-ECHO/C-STORE node. It accepts CR and DX (for presentation) images, uncompressed or JPEG/JPEG-LS/JPEG
    2000/RLE compressed, classifies each with the input gate on, appends one JSON line per image to
    OUT/results.jsonl and, with --send-to, answers with a DICOM structured report in the image's study. Research
    software, not a medical device: send its answers to a research destination, never into a clinical worklist.
    Images are acknowledged only once spooled to OUT/spool/ (answered at the next start after a crash). Stops on
    SIGTERM or Ctrl-C, with a results row for every acknowledged image within --stop-timeout."""
    o = _options(ListenOptions, args)
    import dataclasses

    from pneumoscan.inference.classifier import Classifier
    from pneumoscan.serving.dicom_node import DicomNode, NodeLimits, check_ae_title, destination

    send_to = destination(o.send_to) if o.send_to else None
    if o.send_cam and not send_to:
        raise PneumoscanError("--send-cam goes with --send-to AETITLE@HOST:PORT")
    for title in (o.ae_title, *(o.allow or ())):
        check_ae_title(title)
    if not o.allow:
        print("pneumoscan: warning: any calling AE title may store images here; restrict with --allow", file=sys.stderr)
    limits = dataclasses.replace(
        NodeLimits(),
        max_associations=o.max_associations,
        peer_associations=o.peer_associations,
        network_timeout=o.idle_timeout,
        send_timeout=o.send_timeout,
        stop_timeout=o.stop_timeout,
    )
    clf = Classifier.load(o.model, engine=o.engine, int8=o.int8, fp32=o.fp32)
    node = DicomNode(
        clf,
        o.out,
        ae_title=o.ae_title,
        host=o.host,
        port=o.port,
        send_to=send_to,
        send_cam=o.send_cam,
        allow=o.allow,
        limits=limits,
    )
    with _node_log():
        node.serve_forever()
    c = node.counts
    print(
        f"{c['received']} received, {c['classified']} classified, {c['refused']} refused, {c['failed']} failed, "
        f"{c['rejected']} rejected, {c['sent']} reports sent, {c['send_failed']} not sent; "
        f"results in {printable(node.results_path)}",
        file=sys.stderr,
    )
    return 0


@command("ensemble", help="combine 1 to 8 bundles into one ensemble bundle (mean of calibrated logits)")
def _run_ensemble(args) -> int:
    """Copy the member bundles into OUT/members/ and write an ensemble bundle: the combined logit is the mean of each
    member's logit divided by its temperature; the ensemble's own temperature is fitted on the validation images no
    member was trained on, threshold 0.5 (balanced). The first member is the primary: its features feed the input
    gate and the bacterial/viral head, and Grad-CAM explains it. Members must share the image size and may not be
    ensembles."""
    from pneumoscan.evaluation.evaluate import metrics_table
    from pneumoscan.training.ensemble import make_ensemble

    given = settings.given(EnsembleOptions, args)
    names = given.pop("names", None)
    names = [n.strip() for n in names.split(",")] if names else None
    bundle = make_ensemble(given.pop("members"), given.pop("out"), names=names, **given)
    report = {**bundle.metrics["validation"], "model": {"name": bundle.name}}
    print(metrics_table(report))
    print(f"temperature {bundle.temperature:.4f}, threshold {bundle.threshold:.4f} ({bundle.config['threshold_rule']})")
    print(f"ensemble bundle written to {printable(bundle.path)}")
    return 0


@command("models", help="list the bundled models that --model NAME accepts")
def _run_models(args) -> int:
    """The models shipped inside the package, by the name --model accepts: their folder, size and the accuracy their
    metrics record (test where recorded, else validation)."""
    from pneumoscan.model.store import bundled_models_table

    print(bundled_models_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pneumoscan.core.package import __version__

    parser = _Parser(
        prog="pneumoscan",
        description="Pneumonia detection on chest X-rays: "
        "train, evaluate, explain and serve a transfer-learning classifier.",
    )
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for name, (summary, run) in _COMMANDS.items():
        group, _, leaf = name.rpartition(" ")
        if group and group not in groups:
            groups[group] = sub.add_parser(group, help=_GROUPS[group]).add_subparsers(
                dest=f"{group}_command", required=True
            )
        p = (groups[group] if group else sub).add_parser(leaf, help=summary, description=inspect.getdoc(run))
        _add_options(p, name)
        p.set_defaults(run=run)
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
