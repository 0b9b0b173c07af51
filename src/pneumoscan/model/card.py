"""MODEL_CARD.md: what a bundle is, where its numbers come from, and where it fails.

Every string taken from a bundle is written as inert Markdown (:func:`text.markdown_text`): a card
never carries HTML or links that its bundle's author slipped into a name or a note."""

from __future__ import annotations

from pneumoscan.core.text import markdown_text as md
from pneumoscan.core.text import number as _fmt
from pneumoscan.core.text import with_ci as _with_ci
from pneumoscan.model.backbones import HEAD
from pneumoscan.model.schema import ENSEMBLE_FORMAT

GENERALISATION_NOTE = (
    "Validation patients come from the training hospital and overstate what another hospital will see: "
    "the held-out test split (other patients, another time) is the better guide, and labelled local "
    "images (pneumoscan calibrate, then evaluate) the best."
)


def preprocessing_line(bundle) -> str:
    """How a film becomes the input, in words (images.Preprocessing)."""
    p = bundle.preprocessing
    if p.jpeg_quality is None:
        return f"a film of another size is resized ({p.resample}) to it"
    return (
        f"a film of another size is resized ({p.resample}) to it, then JPEG-encoded at quality {p.jpeg_quality} "
        "and decoded, as the Kermany 224 px training copies were made"
    )


def adaptation_section(config: dict) -> str:
    """What an adapted bundle (pneumoscan adapt) was adapted on, and what that leaves unvalidated."""
    a = config.get("adaptation")
    if not a:
        return ""
    dropped = ", ".join(md(str(d)) for d in a.get("dropped", [])) or "none"
    return (
        f"\n## Adaptation\nBatch-norm statistics of the stem re-estimated on {a['films']} unlabelled films of the "
        f"folder {md(a['data'])} (sha256 of their sorted digests `{md(a['films_sha256'])}`) on {md(a['date'])}, "
        f"aligned to training films; every weight is its source's: {md(a['source'])} "
        f"version {md(a['source_version'])}, "
        f"weights sha256 `{md(a['source_weights_sha256'])}`. Heads dropped: {dropped} (their outputs could not be "
        "checked on the site's films). The threshold and temperature are the source's, fitted before adaptation: "
        "they are not validated on this network; refit them with `pneumoscan calibrate` on labelled local films and "
        "evaluate on others before use. The source's metrics do not describe these weights and are not carried.\n"
    )


def _calibration_advice(site: dict | None) -> str:
    if site:
        return "Threshold and temperature were refitted on labelled local images (see Model)."
    return (
        "Threshold and temperature come from validation patients of the training\n"
        "hospital only: before use elsewhere, refit them on labelled local images with `pneumoscan calibrate`, then\n"
        "evaluate on other local images."
    )


FAILURE_MODES = """## Known failure modes and limits
- Adults: trained only on children aged 1 to 5; adult anatomy and disease patterns differ.
- Other hospitals, scanners and processing: one centre's images; contrast, sharpness and burned-in markers
  are known shortcuts on this data, and performance elsewhere is unknown.
- Lateral or posterior-anterior views, cropped or rotated images, non-chest images: out of scope; the model
  still outputs a probability for them.
- Devices and lines (tubes, catheters, electrodes) and post-operative images are not represented.
- The test split's normal images are called pneumonia more often than validation predicts: expect lower
  specificity than on validation.
"""


def pretrained_line(config: dict) -> str:
    """Where the backbone's pretrained weights came from, as the bundle records it (hostile text escaped)."""
    record = config.get("pretrained")
    if not isinstance(record, dict) or "sha256" not in record:
        return "pretrained weights; provenance not recorded"
    fields = (record.get("package"), record.get("version"), record.get("file"), record.get("licence"))
    package, version, file, licence = (md(str(f)) for f in fields)
    return f"pretrained weights from {package} {version}, `{file}`, sha256 `{md(str(record['sha256']))}`, {licence}"


def metric_rows(metrics: dict) -> list[str]:
    """The card's metrics table rows: validation, in-sample calibration set and test, where recorded."""
    rows = []
    for split, label in (
        ("validation", "validation"),
        ("calibration", "calibration set (in-sample)"),
        ("test", "test"),
    ):
        r = metrics.get(split)
        if r:
            engine = f", {md(r['engine'])}" if isinstance(r.get("engine"), str) else ""
            rows.append(
                f"| {label} ({r['n']} images, {r.get('patients', '?')} patients{engine}) | {_with_ci(r, 'auc')} | "
                f"{_with_ci(r, 'accuracy')} | {_with_ci(r, 'sensitivity')} | {_with_ci(r, 'specificity')} | "
                f"{_fmt(r.get('loss'))} | {_fmt(r.get('ece'))} |"
            )
    return rows


def metrics_section(threshold: float, metrics: dict) -> str:
    """The card's metrics section, single model or ensemble: a table of every split recorded."""
    rows = metric_rows(metrics)
    return f"""## Metrics (threshold {threshold:.3f}; 95% intervals by patient bootstrap)
| split | AUC | accuracy | sensitivity | specificity | loss | ECE |
|---|---|---|---|---|---|---|
{chr(10).join(rows) if rows else "| (no metrics recorded) | | | | | | |"}"""


def ensemble_card(bundle) -> str:
    """MODEL_CARD.md for an ensemble: its members, how they combine, its own metrics."""
    c = bundle.config
    members = "\n".join(
        f"| {'primary: ' if i == 0 else ''}`{name}` | {md(m.name)} | `{m.backbone}` | {m.temperature:.4f} | "
        f"{_with_ci(m.metrics.get('validation') or {}, 'auc')} | `{m.weights_sha256[:16]}` |"
        for i, (name, m) in enumerate(zip(bundle.member_names, bundle.members))
    )
    files = bundle.primary.config.get("files", {})
    return f"""# Model card: {md(c.get("name", bundle.path.name))}

**Research software, not a medical device.** It must not be used to diagnose, treat or triage patients.

## Model
An ensemble of {len(bundle.members)} models (`pneumoscan-ensemble/1`), each a complete bundle under `members/` with
its own model card. The combined logit is the mean of each member's logit divided by its own temperature; the
ensemble's temperature {c["temperature"]:.4f} and threshold {c["threshold"]:.4f}
({md(c.get("threshold_rule", "youden"))}) then apply: {md(bundle.operating_point_source)}.
The primary member's pooled features feed the input gate and the bacterial/viral head (its own files), and
Grad-CAM explains the primary member (for the class the ensemble predicts).

| member | name | backbone | temperature | validation AUC | weights sha256 (first 16) |
|---|---|---|---|---|---|
{members}

- Input: {c["image_size"]}x{c["image_size"]} grey image (aspect ratio squashed), prepared once for every member;
  {preprocessing_line(bundle)}.
- Weights digest of the ensemble (sha256 of the members' weights digests, one per line): `{bundle.weights_sha256}`.
- Input gate: {"the primary member's" if "gate.safetensors" in files else "none: every image gets a label"}.
- Bacterial/viral head: {"the primary member's" if "subtype.safetensors" in files else "none"}.

## Intended use
Research on, and screening support for, pneumonia on paediatric anterior-posterior chest radiographs, with a
clinician reading every image. {_calibration_advice(c.get("calibration"))}

{metrics_section(c["threshold"], bundle.metrics)}

{GENERALISATION_NOTE}
{_notes(c)}
{FAILURE_MODES}"""


def model_card(bundle) -> str:
    """MODEL_CARD.md for a bundle, from its config and metrics."""
    if bundle.config.get("format") == ENSEMBLE_FORMAT:
        return ensemble_card(bundle)
    c, metrics = bundle.config, bundle.metrics
    training = c.get("training", {})
    site = c.get("calibration")
    fitted_on = md(bundle.operating_point_source) + (
        f"\n  (its source, {md(site['source'])}{_source_version(site)}, had {site['source_threshold']:.4f} "
        f"and {site['source_temperature']:.4f})"
        if site
        else ""
    )
    subtype_rows = [
        f"| {label} ({st['n']} true pneumonia: {st.get('n_bacterial', '?')} bacterial, {st.get('n_viral', '?')} "
        f"viral) | {_with_ci(st, 'auc')} | {_with_ci(st, 'accuracy')} | {_with_ci(st, 'sensitivity')} | "
        f"{_with_ci(st, 'specificity')} | {_fmt(st.get('loss'))} |"
        for split, label in (("validation", "validation"), ("test", "test"))
        if isinstance(st := (metrics.get(split) or {}).get("subtype"), dict)
    ]
    subtype = (
        "\n## Bacterial or viral (a second head on the same features; viral is the positive class)\n"
        f"PNEUMONIA results carry `subtype` and `viral_probability`; viral when the probability is at least "
        f"{bundle.load_subtype().threshold:.3f}.\n\n"
        "| split | AUC | accuracy | sensitivity (viral) | specificity (bacterial) | loss |\n|---|---|---|---|---|---|\n"
        + "".join(row + "\n" for row in subtype_rows)
        + "| Kermany et al. 2018 | 0.940 | 0.907 | 0.886 | 0.909 | |\n"
        if "subtype.safetensors" in c.get("files", {})
        else ""
    )
    gate = (
        "\n## Input gate\nAn input is refused as not a chest X-ray when its image statistics (histogram, edges, "
        "the layout of a frontal film), its orientation or the network's pooled features lie far from the "
        "training X-rays; rotated and inverted films are refused saying so; `--no-gate` / `gate=False` label "
        "them anyway. Each limit keeps 99.85% of validation X-rays, clean and under acquisition perturbations "
        "(the int8 model's feature limit is fitted on its own features). Accepted films whose statistics lie "
        "beyond every validation X-ray carry `warnings` (very bright or dark, low contrast, blurred, padded, "
        "written over, colour). `python benchmarks/gate_ood.py --model BUNDLE` measures it per engine "
        "(docs/gate.md has the bundled model's table). It is not meant to catch chest X-rays outside the "
        "intended population (adults, lateral views, other hospitals), which look like what it was fitted on; "
        "no adult films were at hand to measure it on.\n"
        if "gate.safetensors" in c.get("files", {})
        else "\n## Input gate\nNone: this bundle labels every image, chest X-ray or not.\n"
    )
    cal = (metrics.get("test") or {}).get("calibration")
    calibration = (
        f"On test, temperature scaling changed ECE from {_fmt(cal['ece_before'])} to {_fmt(cal['ece_after'])} "
        f"and log loss from {_fmt(cal['loss_before'])} to {_fmt(cal['loss_after'])}."
        if cal
        else ""
    )
    return f"""# Model card: {md(c.get("name", bundle.path.name))}

**Research software, not a medical device.** It must not be used to diagnose, treat or triage patients.

## Model
- Backbone: `{c["backbone"]}` ({pretrained_line(c)}), {head_line(c)}, one logit.
- Input: {c["image_size"]}x{c["image_size"]} grey image (aspect ratio squashed), replicated to 3 channels,
  ImageNet mean/std; {preprocessing_line(bundle)}.
- Operating threshold {c["threshold"]:.4f} ({md(c.get("threshold_rule", "youden"))}) and
  temperature {c["temperature"]:.4f}: {fitted_on}.
- Weights sha256: `{c["weights_sha256"]}`.{_head_only_line(c)}{teacher_line(c)}

## Intended use
Research on, and screening support for, pneumonia on paediatric anterior-posterior chest radiographs, with a
clinician reading every image. {_calibration_advice(site)}

## Training data
{training_data_section(training)}

{metrics_section(c["threshold"], bundle.metrics)}

{GENERALISATION_NOTE}

{calibration}
{subtype}{gate}{adaptation_section(c)}
{_notes(c)}
{FAILURE_MODES}"""


OFFICIAL_TRAIN = {"n_normal": 1341, "n_pneumonia": 3875}  # the Kermany train split (Kaggle and Mendeley v2/v3)
KERMANY = """Kermany et al. 2018, "Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning",
Cell 172(5):1122-1131; data on Mendeley Data (licence CC BY 4.0), the same as Kaggle's "Chest X-Ray Images (Pneumonia)".
Paediatric patients aged 1 to 5 at Guangzhou Women and Children's Medical Center, anterior-posterior views."""


def is_official_train(training: dict) -> bool:
    """Whether the images trained on (train plus the validation patients carved from it) are, by their class
    counts, the whole official Kermany train split."""
    parts = [training.get("train", {}), training.get("validation", {})]
    counts = {k: sum(p.get(k, 0) for p in parts if isinstance(p.get(k, 0), int)) for k in OFFICIAL_TRAIN}
    return counts == OFFICIAL_TRAIN


def training_data_section(training: dict) -> str:
    """What the network was trained on, as the bundle records it: the official split only when its counts are
    the official split's; otherwise the folder and its counts, claiming nothing about the patients."""
    tr, val = training.get("train", {}), training.get("validation", {})
    counts = (
        f"{md(tr.get('images', '?'))} images: {md(tr.get('n_normal', '?'))} NORMAL,\n{md(tr.get('n_pneumonia', '?'))} "
        f"PNEUMONIA, {md(tr.get('patients', '?'))} patients), with validation patients held out\nof train "
        f"({md(val.get('images', '?'))} images)."
    )
    if is_official_train(training):
        return f"{KERMANY}\nTrained on the official train split ({counts}"
    folder = md(str(training.get("data") or "an unrecorded folder"))
    return (
        f"Trained on the folder {folder} ({counts} Not the official Kermany train split (its "
        f"{sum(OFFICIAL_TRAIN.values())} images): where these images come from, which patients and how they were "
        "labelled is not recorded here, so the population statements below hold only as far as they describe it."
    )


def _source_version(site: dict) -> str:
    version = str(site.get("source_version") or "")
    return f" version {md(version)}" if version else ""


def _notes(config: dict) -> str:
    return f"\n## How this model was chosen\n{md(config['notes'])}\n" if config.get("notes") else ""


def _head_only_line(config: dict) -> str:
    if config.get("weights_scope") != "head":
        return ""
    graph = config.get("training", {}).get("features_graph", {})
    return (
        "\n- The weights hold the head alone: the frozen backbone is rebuilt from the registry, pinned by the "
        "sha256 above, and `model.onnx` carries it with int8 MatMul weights (dynamic quantisation; features "
        f"graph sha256 `{md(str(graph.get('sha256', '?')))}`), the graph whose features the head was fitted on."
    )


def head_line(config: dict) -> str:
    recipe = config.get("training", {}).get("recipe", {})
    if recipe.get("frozen_features") and recipe.get("head") == "logistic":
        return "kept frozen; a logistic-regression head on its features (stored as 2 ReLU units: relu(z) - relu(-z))"
    frozen = "kept frozen; " if recipe.get("frozen_features") else ""
    hidden, dropout = config.get("hidden", HEAD["hidden"]), config.get("dropout", HEAD["dropout"])
    return f"{frozen}a dense head ({hidden} units, ReLU, dropout {dropout})"


def teacher_line(config: dict) -> str:
    """Where a distilled model's soft targets came from (empty for a model trained on labels alone)."""
    record = config.get("training", {}).get("teacher")
    if not isinstance(record, dict):
        return ""
    weight = record.get("weight")
    share = f"{weight:g}" if isinstance(weight, (int, float)) and not isinstance(weight, bool) else "?"
    name, path = md(str(record.get("name", "?"))), md(str(record.get("path", "?")))
    digest = md(str(record.get("weights_sha256", "?")))
    return (
        f"\n- Distilled from the bundle {name} ({path}, weights sha256 `{digest}`): loss = (1 - {share}) x "
        f"class-weighted "
        f"BCE against the labels + {share} x BCE against its calibrated probabilities."
    )
