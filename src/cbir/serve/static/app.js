// The search page: pick or drop an image, POST it to /search, show the hits as a grid. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(window.location.search);
let apiKey = params.get("key") || "";
let chosenFile = null;

function authHeaders() {
  const key = apiKey || $("key-input").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${body.error || response.statusText} (HTTP ${response.status})`;
  } catch (_) {
    return `the service answered HTTP ${response.status} ${response.statusText}`;
  }
}

async function loadHealth() {
  try {
    const response = await fetch("/health");
    if (!response.ok) throw new Error(await errorMessage(response));
    const health = await response.json();
    $("status").textContent = `${health.index_size.toLocaleString()} indexed images · ${health.model} · ` +
      `${health.embedding_dim}-d embeddings`;
    $("k-input").max = health.max_k;
    $("k-input").value = health.default_k;  // the server's default (serve.yaml k), not a number of the page's own
    for (const name of health.preprocess_options) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      $("preprocess-select").append(option);
    }
    $("filter-label").hidden = !health.labelled;  // a label filter needs labels in the index
    $("key-label").hidden = !(health.api_key_required && !apiKey);
  } catch (error) {
    $("status").textContent = "";
    showError(`cannot reach the service: ${error.message}`);
  }
}

function chooseFile(file) {
  if (!file) return;
  chosenFile = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  preview.alt = `query: ${file.name}`;
  $("drop-hint").textContent = file.name;
  $("search-button").disabled = false;
  showError("");
  search();
}

async function thumbnailSource(url) {
  if (!Object.keys(authHeaders()).length) return url;  // plain <img src>: the browser caches it
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) return "";
  return URL.createObjectURL(await response.blob());
}

function resultTile(hit) {
  const figure = document.createElement("figure");
  figure.className = "result";
  const image = document.createElement("img");
  image.alt = hit.label ? `${hit.label} (rank ${hit.rank})` : `rank ${hit.rank}`;
  image.loading = "lazy";
  thumbnailSource(hit.thumbnail_url).then((src) => { image.src = src; });
  const caption = document.createElement("figcaption");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `#${hit.rank} · score ${hit.score.toFixed(3)}`
    + (hit.match !== null && hit.match !== undefined ? ` · match ${Math.round(100 * hit.match)}%` : "");
  if (hit.match !== null && hit.match !== undefined) {
    score.title = "probability that this hit shows the query's class, measured on the index's labelled images";
  }
  caption.append(score);
  if (hit.label !== null) {
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = hit.label;
    caption.append(label);
  }
  if (hit.path) {
    const path = document.createElement("span");
    path.className = "path";
    path.textContent = hit.path;
    caption.append(path);
  }
  figure.append(image, caption);
  return figure;
}

async function search(event) {
  if (event) event.preventDefault();
  if (!chosenFile) { showError("choose an image first"); return; }
  const form = new FormData();
  form.append("image", chosenFile, chosenFile.name);
  if ($("k-input").value) form.append("k", $("k-input").value);  // empty: the server's default k
  if ($("preprocess-select").value) form.append("preprocess", $("preprocess-select").value);
  const label = $("filter-input").value.trim();
  if (label) form.append("filter", `label == ${JSON.stringify(label)}`);  // only hits of this label
  $("search-button").disabled = true;
  $("summary").textContent = "searching…";
  showError("");
  try {
    const response = await fetch("/search", { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) {
      $("summary").textContent = "";
      $("predicted").hidden = true;
      $("results").replaceChildren();
      showError(await errorMessage(response));
      if (response.status === 401) $("key-label").hidden = false;
      return;
    }
    const body = await response.json();
    $("summary").textContent = `${body.results.length} results for ${body.query.width}×${body.query.height} ` +
      `query in ${body.took_ms.toFixed(0)} ms`;
    const predicted = body.predicted;  // only when the index holds labels
    $("predicted").hidden = !predicted;
    $("predicted").textContent = predicted ?
      `predicted class: ${predicted.label} (${Math.round(100 * predicted.confidence)}% of the neighbours' votes)` : "";
    $("results").replaceChildren(...body.results.map(resultTile));
  } catch (error) {
    $("summary").textContent = "";
    showError(`search failed: ${error.message}`);
  } finally {
    $("search-button").disabled = false;
  }
}

function setUp() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  ["dragenter", "dragover"].forEach((name) => zone.addEventListener(name, (e) => {
    e.preventDefault();
    zone.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((name) => zone.addEventListener(name, (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
  }));
  zone.addEventListener("drop", (e) => chooseFile(e.dataTransfer.files[0]));
  $("search-form").addEventListener("submit", search);
  loadHealth();
}

setUp();
