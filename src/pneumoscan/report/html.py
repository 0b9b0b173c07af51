"""report.html: one self-contained page (figures embedded, nothing from the network)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from pneumoscan.core.metrics import CI_METRICS, HEADLINE, undefined_reason
from pneumoscan.core.text import UNDEFINED, number
from pneumoscan.core.text import number as _fmt

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
body{line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:16px}
h1{font-size:1.5rem;margin:.4em 0}
h2{font-size:1.15rem;margin-top:1.6em;border-bottom:1px solid #d8dce3;padding-bottom:.2em}
.notice{background:#fff4d6;border:1px solid #e8c66a;border-radius:6px;padding:.6em .9em}
.wrap{max-width:100%}table{border-collapse:collapse;background:#fff;width:100%;font-size:.9rem;margin:.4em 0}
th,td{border:1px solid #dde1e7;padding:.3em .45em;text-align:left}td.num,tr:first-child th{white-space:nowrap}
td small{display:block;white-space:nowrap;color:#4a5263}
th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px}
figure.wide{grid-column:1/-1}img{width:100%;height:auto}figcaption{font-size:.9rem;color:#4a5263;margin-top:4px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;background:#fff;padding:.6em}
dl{border:1px solid #dde1e7}
dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere;min-width:0}
.foot{font-size:.85rem;color:#4a5263}
@media (max-width:900px){main{padding:8px}table{font-size:.82rem}th,td{padding:.25em .3em}}
"""

_KEYS = (*CI_METRICS, "ece")
# two tables, so that each fits a 800 px window without scrolling sideways: the headline metrics, then the rest
_TABLES = (("metrics", HEADLINE), ("metrics-more", tuple(k for k in _KEYS if k not in HEADLINE)))
_UNDEFINED_NOTE = (
    '<p class="foot">"undefined": the metric has no value on these images (AUC with one class present, '
    "sensitivity, precision or F1 without a positive case, precision without a positive call, specificity without "
    "a negative case); it is not zero. &mdash;: not reported for that reference.</p>"
)
_WIDE = ("random", "false", "Training")  # figures shown full width


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _cell(report: dict, key: str) -> str:
    value = report.get(key)
    if value is None:  # undefined, with why where the confusion matrix says; never an interval beside it
        reason = undefined_reason(report, key)
        return f'<td class="num">{UNDEFINED}' + (f" <small>({html.escape(reason)})</small>" if reason else "") + "</td>"
    ci = (report.get("ci95") or {}).get(key)
    text = _fmt(value) + (f" <small>({ci[0]:.3f}&ndash;{ci[1]:.3f})</small>" if ci else "")
    return f'<td class="num">{text}</td>'


def _reference_cell(reference: dict, key: str) -> str:
    value = reference.get(key)
    if value is None:  # the reference did not report it: a dash, not "undefined"
        return '<td class="num" title="not reported">&mdash;</td>'
    return f'<td class="num">{_fmt(value)}</td>'


def _rows(results, references: dict) -> list[tuple[str, dict, object]]:
    """(label, report, how its cells are written) for each row of the metrics tables."""
    rows = []
    for r in results:
        rep = r.report
        rows.append((f"{r.name}, threshold {rep['threshold']:.3f}", rep))
        if abs(rep["threshold"] - 0.5) > 5e-7:  # a second row only where 0.5 is another threshold
            rows.append((f"{r.name}, threshold 0.5", rep["at_0.5"]))
        if "cross_fit" in rep:
            cf = rep["cross_fit"]
            rows.append((f"{r.name}, cross-fitted local calibration ({cf['folds']} folds, {cf['rule']})", cf))
        if "subtype" in rep:
            st = rep["subtype"]
            rows.append((f"{r.name}: bacterial or viral, {st['n']} true pneumonia (viral positive)", st))
    return [(label, part, _cell) for label, part in rows] + [(k, v, _reference_cell) for k, v in references.items()]


def _metrics_table(results, references: dict) -> str:
    rows = _rows(results, references)
    tables = []
    for table_id, keys in _TABLES:
        head = "".join(f"<th>{k.upper() if k in ('auc', 'ece') else k}</th>" for k in keys)
        body = "".join(
            f"<tr><th>{html.escape(label)}</th>{''.join(cell(part, k) for k in keys)}</tr>"
            for label, part, cell in rows
        )
        tables.append(f'<table id="{table_id}"><tr><th>model</th>{head}</tr>{body}</table>')
    return f'<div class="wrap">{"".join(tables)}</div>{_UNDEFINED_NOTE}'


def _model_section(r) -> str:
    c = r.classifier.bundle.config
    params = r.classifier.bundle.parameter_count()
    items = {
        "bundle": str(r.classifier.bundle.path),
        "backbone": r.classifier.bundle.backbone,
        "parameters": f"{params:,}" if params else "n/a",
        "image size": f"{c['image_size']} px",
        "threshold": f"{c['threshold']:.4f} ({c.get('threshold_rule', 'youden')})",
        "operating point": r.classifier.bundle.operating_point_source,
        "temperature": f"{c['temperature']:.4f}",
        "engine": r.classifier.engine.name,
    }
    (tn, fp), (fn, tp) = r.report["confusion_matrix"]
    items["confusion at threshold"] = f"TN {tn}, FP {fp}, FN {fn}, TP {tp}"
    cal = r.report["calibration"]
    items["calibration"] = calibration_line(cal)
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items())
    return f"<h3>{html.escape(r.name)}</h3><dl>{rows}</dl>"


def write_report(path: Path, results, summary: dict, references: dict) -> Path:
    data = summary["data"]
    split = summary["split"] or "all"
    where = f"{split} split" if summary.get("is_split", True) else f"folder {split}"
    parts = [
        f"<h1>pneumoscan evaluation: {html.escape(where)}</h1>",
        '<p class="notice">Research software, not a medical device. Metrics are on the '
        f"{html.escape(where)}; each model's threshold and temperature were "
        "fitted on other data, named in its section.</p>",
        "<h2>Data</h2>",
        f"<p>{data['images']} images: {data['n_normal']} NORMAL, {data['n_pneumonia']} PNEUMONIA, "
        f"from {data['patients']} patients.</p>",
    ]
    unreadable = results[0].report.get("unreadable") or []
    if unreadable:
        parts.append(
            f"<p>{len(unreadable)} unreadable files skipped: " + "; ".join(map(html.escape, unreadable[:20])) + "</p>"
        )
    parts.append("<h2>Model</h2>" + "".join(_model_section(r) for r in results))
    parts.append(
        "<h2>Metrics (95% intervals: bootstrap over patients, 2000 resamples)</h2>"
        + _metrics_table(results, references)
    )
    if "comparison" in summary:
        c = summary["comparison"]
        parts.append(
            f"<h2>Comparison</h2><p>AUC difference (A &minus; B; A is {html.escape(c['a'])}, "
            f"B is {html.escape(c['b'])}) on {c['n']} shared images: "
            f"{_fmt(c['difference'], 4)} (95% CI {_fmt((c['ci95'] or [None])[0], 4)} to "
            f"{_fmt((c['ci95'] or [None, None])[1], 4)}), p = {_fmt(c['p_value'], 4)} ({c['method']}).</p>"
        )
    for r in results:
        figures = "".join(
            f'<figure class="{"wide" if any(w in title for w in _WIDE) else ""}">'
            f'<img alt="{html.escape(title)}" src="{_img(p)}"><figcaption>{html.escape(title)}</figcaption></figure>'
            for title, p in r.figures.items()
        )
        parts.append(f"<h2>Figures: {html.escape(r.name)}</h2><div class='figs'>{figures}</div>")
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>pneumoscan evaluation</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(parts)}</main></body></html>"
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def calibration_line(cal: dict) -> str:
    """What the temperature is and where it came from, then ECE and log loss on these images without it and
    with it, in that order: the comparison as it is, never read as a fit made on these images."""
    return (
        f"temperature T = {cal['temperature']:.3f}, fitted to minimise log loss on the model's own "
        "validation (or site calibration) data, not on these images; on these images, without T (T = 1) and with it: "
        f"ECE {number(cal['ece_before'])} and {number(cal['ece_after'])}, "
        f"log loss {number(cal['loss_before'])} and {number(cal['loss_after'])}"
    )
