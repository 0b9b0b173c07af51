"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (x) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(3));

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

// Everything shown comes from the server, and so from a bundle or an upload someone else made:
// it is always inserted as text (textContent, attributes), never parsed as HTML.
function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

const SPLITS = [
  ["validation", "validation (training hospital, held-out patients)"],
  ["test", "held-out test split (other patients, another time)"],
  ["calibration", "calibration set (in-sample)"],
];
const METRICS = [["auc", "AUC"], ["accuracy", "accuracy"], ["sensitivity", "sensitivity"], ["specificity", "specificity"]];

function metricCell(report, key) {
  const ci = report.ci95 && Array.isArray(report.ci95[key]) ? ` (${fmt(report.ci95[key][0])}–${fmt(report.ci95[key][1])})` : "";
  return `${fmt(report[key])}${ci}`;
}

function metricsTable(metrics) {
  const shown = SPLITS.filter(([key]) => metrics[key] && typeof metrics[key] === "object");
  const table = el("table", null, { id: "metrics" });
  table.append(el("caption", "95% intervals by patient bootstrap", { class: "small" }));
  const head = el("tr");
  head.append(el("th", "metric"));
  shown.forEach(([key, label]) => head.append(el("th", `${label}, ${metrics[key].n} images`, { id: `split-${key}` })));
  table.append(head);
  for (const [key, label] of METRICS) {
    const row = el("tr");
    row.append(el("th", label));
    shown.forEach(([split]) => row.append(el("td", metricCell(metrics[split], key), { id: `metric-${split}-${key}` })));
    table.append(row);
  }
  return table;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/model");
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    const info = await response.json();
    const config = info.config || {};
    const metrics = info.metrics || {};
    const box = $("model");
    box.replaceChildren();
    const summary = el("p");
    summary.append(el("b", info.name));
    const kind = config.members ? `ensemble of ${config.members.length}` : config.backbone;
    summary.append(` (${kind}, ${config.image_size} px, engine ${info.engine}); ` +
      `threshold ${fmt(config.threshold)} (${config.threshold_rule || "rule not recorded"}), ` +
      `${info.operating_point}.`);
    box.append(summary);
    box.append(metricsTable(metrics));
    box.append(el("p", info.generalisation_note, { class: "small", id: "generalisation" }));
    // what the loaded model can do, as the server asks it of the model (an ensemble's gate and subtype
    // head are its primary member's: its own config lists no such files)
    const can = info.capabilities || {};
    box.append(el("p", can.input_gate
      ? "Input gate on: images that do not look like paediatric chest X-rays (photographs, other scans, " +
        "documents, screenshots, rotated films) are refused. It does not catch chest X-rays from other " +
        "populations (adults, lateral views), which look like what it was fitted on."
      : "No input gate: every image gets a label, chest X-ray or not.", { class: "small", id: "gate-note" }));
    if (can.subtype) {
      box.append(el("p", "PNEUMONIA results also say bacterial or viral: a second head on the same features, " +
        "less accurate than the first (see the model card).", { class: "small", id: "subtype-note" }));
    }
  } catch (err) {
    $("model").textContent = `Model information could not be loaded: ${err.message}`;
  }
}

// The prediction record's fields, in order, as the server declares them (GET /v1/fields, from
// pneumoscan.output.FIELDS): every field a result has is shown from this list, so a field added to the
// record appears here without a change to this page.
const recordFields = fetch("/v1/fields").then((r) => (r.ok ? r.json() : [])).catch(() => []);

function fieldText(value, digits) {
  if (Array.isArray(value)) return value.map(String).join("; ");
  if (typeof value === "number") return digits === null || digits === undefined ? String(value) : value.toFixed(Math.min(digits, 3));
  return String(value);
}

function fieldsTable(data, fields) {
  const table = el("table", null, { id: "fields" });
  for (const { name, label, digits } of fields) {
    if (data[name] === null || data[name] === undefined) continue;
    const row = el("tr", null, { id: `field-${name}` });
    row.append(el("th", label));
    row.append(el("td", fieldText(data[name], digits)));
    table.append(row);
  }
  return table;
}

// Each upload has a number; only the latest one's answer is shown. A slow answer to an earlier upload
// (an X-ray with its Grad-CAM) arriving after a later refusal is dropped, never drawn under it.
let latest = 0;
let inFlight = null;

function clearResult() {
  $("result").hidden = true;
  $("xray").removeAttribute("src");
  $("overlay").removeAttribute("src");
  ["label", "probability", "threshold", "filename"].forEach((id) => { $(id).textContent = ""; });
  $("label").className = "label";
  $("fill").style.width = "0";
  $("record").replaceChildren();
}

async function classify(file) {
  const ticket = ++latest;
  if (inFlight) inFlight.abort();
  const controller = new AbortController();
  inFlight = controller;
  clearResult();
  $("error").hidden = true;
  $("error").textContent = "";
  $("busy").hidden = false;
  const body = new FormData();
  body.append("file", file);
  try {
    const response = await fetch("/v1/predict?cam=true", { method: "POST", body, signal: controller.signal });
    let data = {};
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    if (ticket !== latest) return;
    if (!response.ok) {
      const detail = typeof data.detail === "string" ? data.detail : `the server answered ${response.status}`;
      throw new Error(detail);
    }
    const fields = await recordFields;
    if (ticket !== latest) return;
    show(data, fields);
  } catch (err) {
    if (ticket !== latest) return;
    clearResult();
    showError(`Could not classify ${file.name}: ${err.message}` +
      (err.message.includes("chest X-ray") ? ". This page labels paediatric chest X-rays only." : ""));
  } finally {
    if (ticket === latest) {
      $("busy").hidden = true;
      inFlight = null;
    }
  }
}

function show(data, fields) {
  if (typeof data.label !== "string" || typeof data.probability !== "number") throw new Error("no label in the answer");
  $("xray").src = `data:image/png;base64,${data.image}`;
  $("overlay").src = `data:image/png;base64,${data.cam}`;
  $("overlay").hidden = !$("cam-toggle").checked;
  $("xray").hidden = $("cam-toggle").checked;
  $("label").textContent = data.label;
  $("label").className = `label ${data.label}`;
  $("fill").style.width = `${(100 * data.probability).toFixed(1)}%`;
  $("mark").style.left = `calc(${(100 * data.threshold).toFixed(1)}% - 1px)`;
  $("probability").textContent = `P(pneumonia) = ${data.probability.toFixed(3)}`;
  $("threshold").textContent = `PNEUMONIA when the probability is at least ${data.threshold.toFixed(3)} (the black mark).`;
  $("record").replaceChildren(fieldsTable(data, fields));
  $("filename").textContent = `model ${data.model} ${data.version}`;
  $("result").hidden = false;
}

$("cam-toggle").addEventListener("change", (e) => {
  $("overlay").hidden = !e.target.checked;
  $("xray").hidden = e.target.checked;
});
$("file").addEventListener("change", (e) => {
  if (e.target.files[0]) classify(e.target.files[0]);
  e.target.value = "";  // choosing the same file again is a new upload too
});
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => { if (e.dataTransfer.files[0]) classify(e.dataTransfer.files[0]); });
loadModel();
