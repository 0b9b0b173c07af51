"""``pneumoscan adapt``: a bundle adapted to a site's own films, without labels (AdaBN).

A network's batch-norm layers normalise each channel by running statistics estimated on the training
hospital's images. Another scanner's exposure, contrast or processing moves those statistics, and every
later layer sees inputs it was not trained on. :func:`adapt_bundle` re-estimates them on the site's films
(decoded and prepared exactly as prediction prepares them) and writes a new bundle: every weight is
unchanged, only the batch-norm means and variances differ.

The stored statistics are not those of clean training films: some layers kept ImageNet's (frozen while
fine-tuning) and the others were averaged over augmented training batches. Replacing them by the site's
plain statistics would move the answers even on films from the training hospital itself. So each layer is
*aligned* instead: its new statistics map the site's films onto the normalised values the training
hospital's films get from the source network (first and second moments per channel, layer after layer).
That needs reference films from the training hospital, never labels: by default a seeded sample of the
bundle's own training data, where that folder is at hand (``source_data``). On training films the adapted
network then answers as the source does.

What stays valid: the pneumonia head and the input gate's image statistics do not depend on the batch-norm
statistics; the gate's feature part reads features that the alignment maps back onto the training ones,
and it is checked on the site's films (the share it accepts is recorded). The bacterial/viral head is
dropped: its outputs could only be checked against bacterial/viral labels. The threshold and temperature
are the source's and are no longer validated; the card says so, and ``pneumoscan calibrate`` on labelled
local films refits them.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumoscan.core.errors import ConfigError, require_train_extra
from pneumoscan.core.options import AdaptOptions
from pneumoscan.core.settings import DECLARED, checked_path, declared
from pneumoscan.core.text import printable
from pneumoscan.io.fileio import ensure_folder
from pneumoscan.model.backbones import sha256_file
from pneumoscan.model.bundle import Bundle, save_bundle
from pneumoscan.model.schema import GATE, SUBTYPE
from pneumoscan.model.store import load_bundle

# Fewest films the gate must accept. The deepest layers' statistics are means over films (a 7 x 7 map each):
# on training films, aligning to 50 of them moved the logits by 0.6 on average, about the spread a new
# estimate from other films gives, and fewer films move them more (docs/adapt.md has the table).
MIN_FILMS = 50
MAX_REFUSED_SHARE = 0.1  # more of the site's films refused by the source's input gate: not a site's chest X-rays
REFERENCE_FILMS = 200  # training films whose statistics the site's films are aligned to
BATCH = 32
# The network's units whose batch norms are re-estimated: the stem, where exposure and contrast enter. Deeper
# layers' statistics also carry what the films show (their share of pneumonia) and were measured on augmented
# batches; re-estimating every layer moved the logits of training films by 3 on average (docs/adapt.md).
ADAPTED_UNITS = 1
MIN_GATE_ACCEPTANCE = 0.95  # below this share of the films it was adapted on accepted by its gate: a warning


@dataclass
class Screened:
    """The site's films after the source bundle's input gate: the accepted ones prepared, the others named."""

    images: np.ndarray
    files: list[Path]
    logits: np.ndarray  # the source network's, on the accepted films
    refused: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)


@declared(AdaptOptions, "data", "out", "model", "source_data", "progress")
def adapt_bundle(
    data: str | Path,
    out: str | Path,
    *,
    model: str | Path | None = DECLARED,
    source_data: str | Path | None = DECLARED,
    progress: bool = DECLARED,
) -> tuple[Bundle, dict]:
    """Adapt the bundle ``model`` (default: the packaged one) to the unlabelled films under ``data`` and write
    it, with fp32 and int8 ONNX models, to ``out``. Returns the new bundle and its adaptation record (also
    in its config.json). A failed adaptation leaves no folder it created."""
    require_train_extra("pneumoscan adapt", ("torch", "timm", "torchvision"))
    source = load_bundle(model)
    refuse_unadaptable(source)
    data, out = checked_path(data, "--data"), checked_path(out, "--out")
    if not data.is_dir():
        raise ConfigError(f"{printable(data)}: --data must be a folder of the site's films")
    if out.resolve() == source.path.resolve():
        raise ConfigError(f"{printable(out)}: write the adapted bundle to a new folder, not over its source")
    created = not out.exists()
    ensure_folder(out)
    try:
        return _adapt(source, data, out, source_data, progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def refuse_unadaptable(bundle) -> None:
    """One line for a bundle whose batch-norm statistics cannot be adapted."""
    from pneumoscan.model.ensemble import Ensemble

    if isinstance(bundle, Ensemble):
        raise ConfigError(
            f"{printable(bundle.path)}: an ensemble is not adapted as one: adapt each member bundle, then combine "
            "the adapted members with pneumoscan ensemble"
        )
    if bundle.head_only:
        raise ConfigError(
            f"{printable(bundle.path)}: a head-only bundle (frozen {bundle.backbone} features) has no batch norm "
            "to re-estimate: nothing to adapt"
        )
    if bundle.load_gate() is None:
        raise ConfigError(
            f"{printable(bundle.path)}: the bundle has no input gate, so the films cannot be checked to be chest "
            "X-rays; fit it first (pneumoscan heads fit)"
        )


def _adapt(source: Bundle, data: Path, out: Path, source_data, progress: bool) -> tuple[Bundle, dict]:
    from pneumoscan.inference.classifier import Classifier
    from pneumoscan.model.onnx_export import export_onnx, quantize_int8

    clf = Classifier(source, engine="torch")
    screened = screen_films(clf, data, progress)
    reference, reference_from = reference_films(source, source_data)
    net = aligned_network(clf.engine.net, reference, screened.images, progress)
    record = adaptation_record(source, data, screened, reference_from, len(reference))
    config = {
        **{k: v for k, v in source.config.items() if k not in ("calibration", "files", "int8")},
        **_identity(source, data),
        "adaptation": record,
    }
    bundle = save_bundle(out, net, config, {}, extras={GATE: source.path / GATE})
    fp32 = export_onnx(bundle)
    # int8 ranges from the site's films and the training hospital's (verify checks on the latter)
    quantize_int8(bundle, fp32, np.concatenate([screened.images[:128], reference[:128]]))
    bundle = load_bundle(out)
    record.update(check_adapted(bundle, screened.images))
    bundle = bundle.write_copy(out, {**bundle.config, "adaptation": record}, {})
    return bundle, record


def screen_films(clf, data: Path, progress: bool) -> Screened:
    """Every image file under ``data``, prepared as prediction prepares it and put to the source bundle's input
    gate (progress bar over the films); the refused and the unreadable are left out, each named. Refuses,
    in one line, too few accepted films or too many refused ones."""
    from tqdm import tqdm

    from pneumoscan.inference.inputs import expand_inputs
    from pneumoscan.inference.result import Prediction
    from pneumoscan.io.images import prepare_with_chroma

    items = expand_inputs([data])
    unreadable = [(x.path, x.error) for x in items if isinstance(x, Prediction)]
    files = [x for x in items if not isinstance(x, Prediction)]
    images, kept, logits, refused = [], [], [], []
    with tqdm(total=len(files), desc="reading the site's films", unit="film", disable=not progress) as bar:
        for start in range(0, len(files), BATCH):
            batch, names, chroma = [], [], []
            for path in files[start : start + BATCH]:
                try:
                    image, colour = prepare_with_chroma(path, clf.bundle.preprocessing)
                except Exception as exc:  # noqa: BLE001 - one film's failure never costs the others
                    unreadable.append((str(path), getattr(exc, "reason", type(exc).__name__)))
                    continue
                batch.append(image), names.append(path), chroma.append(colour)
            if batch:
                stack = np.stack(batch)
                out, features = clf.engine.run(stack)
                results = clf.results([str(n) for n in names], out, features, True, stack, chroma)
                for path, image, logit, r in zip(names, stack, out, results):
                    if r.ok:
                        images.append(image), kept.append(path), logits.append(float(logit))
                    else:
                        refused.append((str(path), r.error))
            bar.update(len(files[start : start + BATCH]))
    screened = Screened(
        np.stack(images) if images else np.zeros((0, clf.image_size, clf.image_size), np.uint8),
        kept,
        np.array(logits),
        refused,
        unreadable,
    )
    check_enough(screened, data)
    return screened


def check_enough(screened: Screened, data: Path) -> None:
    """Refuse too few films, or a folder of which many are not chest X-rays, in one line."""
    accepted, refused = len(screened.files), len(screened.refused)
    counted = f"{accepted} films the input gate accepts ({refused} refused, {len(screened.unreadable)} unreadable)"
    if refused > MAX_REFUSED_SHARE * max(accepted + refused, 1):
        raise ConfigError(
            f"{printable(data)}: {refused} of {accepted + refused} films are refused by the input gate as not chest "
            f"X-rays (over {MAX_REFUSED_SHARE:.0%}): adapt to a folder of the site's chest X-rays only"
        )
    if accepted < MIN_FILMS:
        raise ConfigError(
            f"{printable(data)}: {counted}; adaptation needs at least {MIN_FILMS} (batch-norm statistics from fewer "
            "films are too noisy)"
        )


def reference_films(source: Bundle, source_data: str | Path | None) -> tuple[np.ndarray, str]:
    """Prepared films of the training hospital (no labels read): a seeded sample of :data:`REFERENCE_FILMS` from
    ``source_data``'s train split, by default the training data the bundle records; and where they came from."""
    from pneumoscan.io.dataset import load_images, load_split, shared_data_root

    root = source_data or source.config.get("training", {}).get("data")
    if not source_data and root and not Path(root).is_dir():  # recorded relative to where it was trained
        moved = shared_data_root() / Path(root).name
        root = moved if (moved / "train").is_dir() else root
    if not root or not (Path(root) / "train").is_dir():
        raise ConfigError(
            "adaptation aligns the site's films to the training hospital's: pass --source-data ROOT (the "
            f"bundle's training data, with ROOT/train; this bundle records {printable(root or 'none')})"
        )
    samples = load_split(root, "train")
    pick = np.sort(np.random.default_rng(0).choice(len(samples), min(REFERENCE_FILMS, len(samples)), replace=False))
    images, kept, _ = load_images([samples[i] for i in pick], source.preprocessing, progress=False)
    if len(kept) < MIN_FILMS:
        raise ConfigError(f"{printable(root)}: fewer than {MIN_FILMS} readable training films to align to")
    return images, f"{Path(root).resolve().name}/train"


def batch_norms(net) -> list:
    import torch

    return [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class _Moments:
    """Per-channel mean and variance of a layer's inputs, over films and positions (float64 sums)."""

    def __init__(self, channels: int):
        import torch

        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.squares = torch.zeros(channels, dtype=torch.float64)
        self.count = 0

    def add(self, x) -> None:
        x = x.double()
        self.sum += x.sum((0, 2, 3))
        self.squares += (x * x).sum((0, 2, 3))
        self.count += x.numel() // x.shape[1]

    def mean_var(self):
        mean = self.sum / self.count
        return mean, (self.squares / self.count - mean * mean).clamp_min(0)


def _batches(images: np.ndarray):
    import torch

    for start in range(0, len(images), BATCH):
        yield torch.from_numpy(np.ascontiguousarray(images[start : start + BATCH])).unsqueeze(1)


def input_moments(net, images: np.ndarray, layers: list) -> list[tuple]:
    """The input moments of each of ``layers`` (batch norms of ``net``) over ``images``, through ``net`` as it
    predicts (eval mode)."""
    import torch

    moments = [_Moments(m.num_features) for m in layers]
    hooks = [m.register_forward_pre_hook(lambda m, x, acc=acc: acc.add(x[0])) for m, acc in zip(layers, moments)]
    try:
        with torch.inference_mode():
            for batch in _batches(images):
                net.eval()(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return [m.mean_var() for m in moments]


def aligned_network(net, reference: np.ndarray, site: np.ndarray, progress: bool = False, units: int | None = None):
    """A copy of ``net`` whose first ``units`` (default :data:`ADAPTED_UNITS`) batch-norm statistics give the
    ``site`` films, layer by layer, the normalised moments the ``reference`` (training hospital) films get from
    ``net``. One pass over the site's films sets
    each layer from its batch's moments (the layers after it see inputs already aligned), the next sets every
    layer from the whole set's moments through the network so adapted; the weights are not touched."""
    import torch
    from torch import nn
    from tqdm import tqdm

    net = copy.deepcopy(net).eval()
    prefix = nn.Sequential(net.normalize, *net.body[: ADAPTED_UNITS if units is None else units])  # all that runs
    layers = batch_norms(prefix)
    if not layers:
        raise ConfigError("the network has no batch norm: nothing to adapt")
    source = input_moments(prefix, reference, layers)
    stored = [(m.running_mean.double().clone(), (m.running_var.double() + m.eps).sqrt()) for m in layers]
    targets = [  # each layer's normalised mean and spread on the reference films, through the source network
        ((mean - rm) / rs, (var + m.eps).sqrt() / rs) for (mean, var), (rm, rs), m in zip(source, stored, layers)
    ]

    def set_layer(i: int, mean, var) -> None:
        m, (z_mean, z_sd) = layers[i], targets[i]
        sd = (var + m.eps).sqrt() / z_sd
        m.running_mean.copy_(mean - z_mean * sd)
        m.running_var.copy_((sd * sd - m.eps).clamp_min(0))

    def from_batch(m, x, i):
        values = x[0].double()
        set_layer(i, values.mean((0, 2, 3)), values.var((0, 2, 3), unbiased=False))

    order = np.random.default_rng(0).permutation(len(site))  # batches mix the site's films, whatever their order
    site = np.asarray(site)[order]
    hooks = [m.register_forward_pre_hook(lambda m, x, i=i: from_batch(m, x, i)) for i, m in enumerate(layers)]
    try:
        with torch.inference_mode(), tqdm(total=len(site), desc="aligning", unit="film", disable=not progress) as bar:
            for batch in _batches(site):
                prefix(batch)
                bar.update(len(batch))
    finally:
        for hook in hooks:
            hook.remove()
    for i, (mean, var) in enumerate(input_moments(prefix, site, layers)):
        set_layer(i, mean, var)
    return net


def films_digest(files: list[Path]) -> str:
    """sha256 of the sorted list of the films' sha256 (one hex digest a line): which films, not their order."""
    return hashlib.sha256("\n".join(sorted(sha256_file(f) for f in files)).encode()).hexdigest()


def adaptation_record(source: Bundle, data: Path, screened: Screened, reference_from: str, references: int) -> dict:
    """What config.json records of an adaptation (the folder's name, never its path)."""
    return {
        "method": "AdaBN: batch-norm statistics re-estimated on the site's films, aligned to training films",
        "data": data.resolve().name or "site",
        "films": len(screened.files),
        "films_sha256": films_digest(screened.files),
        "refused_by_gate": len(screened.refused),
        "unreadable": len(screened.unreadable),
        "date": time.strftime("%Y-%m-%d"),
        "source": source.name,
        "source_version": source.version,
        "source_weights_sha256": source.weights_sha256,
        "reference": reference_from,
        "reference_films": references,
        "dropped": ["subtype"] if SUBTYPE in source.config.get("files", {}) else [],
        "source_calibration": "calibration" in source.config,
        "pneumonia_share_source": float(np.mean(screened.logits > _logit(source.threshold))),
    }


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def check_adapted(bundle: Bundle, images: np.ndarray) -> dict:
    """The adapted bundle on the films it was adapted on, per engine (PyTorch on the weights, ONNX Runtime on the
    int8 model): the share its gate accepts (its image statistics are the source's, its feature part reads
    aligned features) and, on the weights, the share called PNEUMONIA."""
    from pneumoscan.inference.classifier import Classifier

    checked = {}
    for engine, int8 in (("torch", False), ("onnx", True)):
        clf = Classifier(bundle, engine=engine, int8=int8)
        logits, features = clf.outputs(images, BATCH)
        name = clf.engine.name.replace("-", "_")
        checked[f"gate_accepts_{name}"] = float(np.mean([v.accepted for v in clf.gate_verdicts(images, features)]))
        if not int8:
            checked["pneumonia_share_adapted"] = float(np.mean(logits > _logit(bundle.threshold)))
    return checked


def gate_warnings(record: dict) -> list[str]:
    """A line per engine whose gate turns away more than a few of the films the bundle was adapted on."""
    return [
        f"the adapted input gate ({key.removeprefix('gate_accepts_').replace('_', '-')}) accepts only {share:.0%} of "
        "the films it was adapted on: check its refusals before use"
        for key, share in record.items()
        if key.startswith("gate_accepts_") and share < MIN_GATE_ACCEPTANCE
    ]


def _identity(source: Bundle, data: Path) -> dict:
    from pneumoscan.training.calibrate import calibrated_identity

    return calibrated_identity(source, data, None, kind="adapted")


__all__ = ["MIN_FILMS", "adapt_bundle", "aligned_network", "gate_warnings", "refuse_unadaptable"]
