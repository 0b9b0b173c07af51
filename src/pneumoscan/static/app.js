"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (x) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(3));

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/model");
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    const info = await response.json();
    const metrics = info.metrics || {};
    const v = metrics.validation || metrics.calibration || {};
    const caption = metrics.validation
      ? "Validation metrics (patients held out of training; 95% intervals)"
      : "Calibration-set metrics (in-sample; 95% intervals)";
    const ci = (key) => (v.ci95 && v.ci95[key] ? ` (${fmt(v.ci95[key][0])}–${fmt(v.ci95[key][1])})` : "");
    const rows = ["auc", "accuracy", "sensitivity", "specificity"].map(
      (k) => `<tr><th>${k === "auc" ? "AUC" : k}</th><td id="metric-${k}">${fmt(v[k])}${ci(k)}</td></tr>`).join("");
    $("model").innerHTML =
      `<p><b>${info.name}</b> (${info.config.backbone}, ${info.config.image_size} px, engine ${info.engine}); ` +
      `threshold ${fmt(info.config.threshold)}, fitted on ${info.operating_point}.</p>` +
      `<table><caption class="small">${caption}</caption>${rows}</table>`;
  } catch (err) {
    $("model").textContent = `Model information could not be loaded: ${err.message}`;
  }
}

async function classify(file) {
  $("error").hidden = true;
  $("busy").hidden = false;
  const body = new FormData();
  body.append("file", file);
  try {
    const response = await fetch("/v1/predict?cam=true", { method: "POST", body });
    let data = {};
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) {
      const detail = typeof data.detail === "string" ? data.detail : `the server answered ${response.status}`;
      throw new Error(detail);
    }
    show(data);
  } catch (err) {
    $("result").hidden = true;
    showError(`Could not classify ${file.name}: ${err.message}`);
  } finally {
    $("busy").hidden = true;
  }
}

function show(data) {
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
  $("filename").textContent = `${data.path} · ${data.model} ${data.version}`;
  $("result").hidden = false;
}

$("cam-toggle").addEventListener("change", (e) => {
  $("overlay").hidden = !e.target.checked;
  $("xray").hidden = e.target.checked;
});
$("file").addEventListener("change", (e) => { if (e.target.files[0]) classify(e.target.files[0]); });
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => { if (e.dataTransfer.files[0]) classify(e.dataTransfer.files[0]); });
loadModel();
