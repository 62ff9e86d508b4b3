// The imgcls page: choose or drop images, POST them to /predict, show each with its top-5 bars.
// No external scripts, fonts or styles: the page works offline.  Names are shown with textContent only.
"use strict";

const TOP_K = 5;
let limits = { max_files: 32, max_upload_bytes: 20 * 1024 * 1024, field: "file" };
let hasThresholds = false;

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

async function loadInfo() {
  try {
    const response = await fetch("info");
    const info = await response.json();
    limits = { ...limits, ...info.limits };
    hasThresholds = Object.keys(info.thresholds || {}).length > 0;
    $("model").textContent = info.model ? "· " + info.model : "";
    const shown = info.labels.slice(0, 12).join(", ") + (info.labels.length > 12 ? ", …" : "");
    $("summary").textContent = `${info.labels.length} classes: ${shown} — engine ${info.engine},` +
      ` input ${info.preprocess.input_size} px, imgcls ${info.imgcls_version}`;
    $("limits").textContent = `up to ${limits.max_files} images and ` +
      `${(limits.max_upload_bytes / 1048576).toFixed(0)} MB per request`;
  } catch (err) {
    $("summary").textContent = "could not read /info: " + err;
  }
}

function newCard(file, before) {
  const card = el("article", "card pending");
  const img = el("img");
  img.alt = file.name;
  img.src = URL.createObjectURL(file);
  // a file the browser cannot show either: a plain box instead of a broken-image icon
  img.addEventListener("error", () => img.replaceWith(el("div", "thumb-missing", "no preview")), { once: true });
  const body = el("div", "body");
  body.append(el("div", "name", file.name), el("div", "label", "classifying…"), el("ul", "bars"));
  card.append(img, body);
  $("results").insertBefore(card, before);  // newest batch on top, each batch in the order chosen
  $("clear").hidden = false;
  return card;
}

function showError(card, message) {
  card.className = "card failed";
  card.querySelector(".label").textContent = message;
}

function showResult(card, result) {
  if (result.error) {
    showError(card, "cannot read: " + result.error);
    return;
  }
  card.className = "card done";
  const label = card.querySelector(".label");
  label.textContent = result.label;
  label.dataset.label = result.label;
  if (hasThresholds && result.decision) {
    const uncertain = result.decision === "uncertain";
    const badge = el("span", "decision" + (uncertain ? " uncertain" : ""), uncertain ? "uncertain" : "sure");
    badge.title = uncertain ? "below the model's threshold for this label: check it" : "at or above the model's threshold";
    label.append(badge);
  }
  const bars = card.querySelector(".bars");
  bars.replaceChildren();
  for (const { label: name, prob } of result.top_k) {
    const item = el("li");
    const fill = el("span", "fill");
    fill.style.width = (100 * prob).toFixed(1) + "%";
    item.append(fill, el("span", "", name), el("span", "", (100 * prob).toFixed(1) + " %"));
    bars.append(item);
  }
}

// Requests of at most max_files files and max_upload_bytes (less a margin for the multipart framing).
function chunks(files) {
  const out = [];
  let current = [], bytes = 0;
  const room = limits.max_upload_bytes - 64 * 1024;
  for (const file of files) {
    if (current.length && (current.length >= limits.max_files || bytes + file.size > room)) {
      out.push(current);
      current = [];
      bytes = 0;
    }
    current.push(file);
    bytes += file.size;
  }
  if (current.length) out.push(current);
  return out;
}

async function send(items) {
  const form = new FormData();
  for (const { file } of items) form.append(limits.field, file, file.name);
  let response, body;
  try {
    response = await fetch(`predict?top_k=${TOP_K}`, { method: "POST", body: form });
    body = await response.json();
  } catch (err) {
    items.forEach(({ card }) => showError(card, "no answer from the server: " + err));
    return 0;
  }
  if (!body.results) {
    items.forEach(({ card }) => showError(card, `refused (${response.status}): ${body.detail}`));
    return 0;
  }
  body.results.forEach((result, i) => showResult(items[i].card, result));
  return body.results.filter((r) => !r.error).length;
}

async function classify(fileList) {
  const files = Array.from(fileList);
  if (!files.length) return;
  const items = [];
  const top = $("results").firstChild;
  for (const file of files) {
    const card = newCard(file, top);
    if (file.size > limits.max_upload_bytes) showError(card, "larger than the server's upload limit");
    else items.push({ file, card });
  }
  setStatus(`classifying ${items.length} image(s)…`);
  let done = 0;
  const byFile = new Map(items.map((item) => [item.file, item]));
  for (const group of chunks(items.map((item) => item.file))) {
    done += await send(group.map((file) => byFile.get(file)));
  }
  const failed = files.length - done;
  setStatus(`${done} image(s) classified` + (failed ? `, ${failed} could not be read` : ""), failed > 0 && !done);
}

function setup() {
  const drop = $("drop");
  $("files").addEventListener("change", (event) => {
    classify(event.target.files);
    event.target.value = "";  // choosing the same file again classifies it again
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    classify(event.dataTransfer.files);
  });
  $("clear").addEventListener("click", () => {
    for (const img of $("results").querySelectorAll("img")) URL.revokeObjectURL(img.src);
    $("results").replaceChildren();
    $("clear").hidden = true;
    setStatus("");
  });
  loadInfo();
}

setup();
