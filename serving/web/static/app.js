// The "draw a digit" page: drawing -> MNIST-like 28x28 input -> every target's answer, side by side.
// Plain JavaScript, no libraries: the page works offline and needs no build step.
"use strict";

const SIDE = 28;          // model input: 28x28 (mnist_client.contract.IMAGE_SHAPE)
const BOX = 20;           // MNIST scaled each digit's bounding box into 20x20, aspect ratio kept...
const CENTRE = SIDE / 2;  // ...and moved its centre of mass to the centre of the 28x28 field
const INK_THRESHOLD = 0.1;  // canvas pixels fainter than this (anti-aliasing fringe) do not widen the box
const DEBOUNCE_MS = 120;  // a pause this long while drawing asks the targets
const MAX_WAIT_MS = 400;  // and while drawing on without a pause, at least this often
const STROKE_WIDTH = 20;  // of 280 px: about 2 px in the 20x20 box, like MNIST's pen
const READY_POLL_MS = 10000;
const FRAMEWORK_NAMES = { pytorch: "PyTorch", tensorflow: "TensorFlow" };
const PROTOCOL_NAMES = { rest: "REST", grpc: "gRPC" };

const canvas = document.getElementById("canvas");
const pen = canvas.getContext("2d", { willReadFrequently: true });
const preview = document.getElementById("preview");
const previewCtx = preview.getContext("2d");
const results = document.getElementById("results");
const labelEl = document.getElementById("label");
const hint = document.getElementById("hint");

let input = null;          // Float32Array(784) in [0, 1], or null when nothing is drawn
let testImageShown = false;
let drawing = false;
let last = null;
let targets = [];          // from /api/targets: [{target, framework, protocol, address, ready}]
let latestResults = null;  // the last answer of /api/predict
let debounceTimer = null;
let lastSentAt = 0;
let inFlight = false;
let sendAgain = false;
let sequence = 0;

// -- drawing ---------------------------------------------------------------------------------------

function clearCanvas() {
  pen.fillStyle = "#000";
  pen.fillRect(0, 0, canvas.width, canvas.height);
}

function point(event) {
  const rect = canvas.getBoundingClientRect();
  return {
    x: (event.clientX - rect.left) * (canvas.width / rect.width),
    y: (event.clientY - rect.top) * (canvas.height / rect.height),
  };
}

function dot(p) {
  pen.fillStyle = "#fff";
  pen.beginPath();
  pen.arc(p.x, p.y, STROKE_WIDTH / 2, 0, 2 * Math.PI);
  pen.fill();
}

function line(a, b) {
  pen.strokeStyle = "#fff";
  pen.lineWidth = STROKE_WIDTH;
  pen.lineCap = "round";
  pen.lineJoin = "round";
  pen.beginPath();
  pen.moveTo(a.x, a.y);
  pen.lineTo(b.x, b.y);
  pen.stroke();
}

canvas.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  if (testImageShown) resetInput();  // drawing starts a new input; it does not scribble on a test image
  canvas.setPointerCapture(event.pointerId);
  drawing = true;
  last = point(event);
  dot(last);
  inputChanged();
});

canvas.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  event.preventDefault();
  // Coalesced events keep fast pen and finger strokes smooth where the browser batches them.
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const e of events.length ? events : [event]) {
    const p = point(e);
    line(last, p);
    last = p;
  }
  inputChanged();
});

function endStroke() {
  if (!drawing) return;
  drawing = false;
  last = null;
  inputChanged(true);
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

// -- drawing -> MNIST-like input ------------------------------------------------------------------------

// The canvas (white ink on black) as MNIST was made: the ink's bounding box scaled into 20x20 with its
// aspect ratio kept (each pixel the average of the canvas pixels it covers), then placed in 28x28 so
// that its centre of mass sits at the centre. Returns null for an empty canvas.
function canvasToInput() {
  const { width, height } = canvas;
  const rgba = pen.getImageData(0, 0, width, height).data;
  const ink = new Float32Array(width * height);
  let minX = width, minY = height, maxX = -1, maxY = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const value = rgba[(y * width + x) * 4] / 255;  // red channel: the ink is white
      ink[y * width + x] = value;
      if (value > INK_THRESHOLD) {
        if (x < minX) minX = x;
        if (x > maxX) maxX = x;
        if (y < minY) minY = y;
        if (y > maxY) maxY = y;
      }
    }
  }
  if (maxX < 0) return null;

  const boxW = maxX - minX + 1, boxH = maxY - minY + 1;
  const scale = BOX / Math.max(boxW, boxH);
  const w = Math.max(1, Math.round(boxW * scale)), h = Math.max(1, Math.round(boxH * scale));
  const sum = new Float32Array(w * h), count = new Float32Array(w * h);
  for (let y = minY; y <= maxY; y++) {
    const ty = Math.min(h - 1, Math.floor(((y - minY) * h) / boxH));
    for (let x = minX; x <= maxX; x++) {
      const tx = Math.min(w - 1, Math.floor(((x - minX) * w) / boxW));
      sum[ty * w + tx] += ink[y * width + x];
      count[ty * w + tx] += 1;
    }
  }
  let mass = 0, mx = 0, my = 0;
  const patch = new Float32Array(w * h);
  for (let i = 0; i < w * h; i++) {
    patch[i] = count[i] ? sum[i] / count[i] : 0;
    mass += patch[i];
    mx += patch[i] * ((i % w) + 0.5);
    my += patch[i] * (Math.floor(i / w) + 0.5);
  }
  const offsetX = Math.round(CENTRE - mx / mass), offsetY = Math.round(CENTRE - my / mass);
  const out = new Float32Array(SIDE * SIDE);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const ox = x + offsetX, oy = y + offsetY;
      if (ox >= 0 && ox < SIDE && oy >= 0 && oy < SIDE) {
        out[oy * SIDE + ox] = Math.min(1, Math.max(0, patch[y * w + x]));
      }
    }
  }
  return out;
}

function showPreview(values) {
  const pixels = previewCtx.createImageData(SIDE, SIDE);
  for (let i = 0; i < SIDE * SIDE; i++) {
    const v = values ? Math.round(values[i] * 255) : 0;
    pixels.data.set([v, v, v, 255], i * 4);
  }
  previewCtx.putImageData(pixels, 0, 0);
}

function inputChanged(now = false) {
  input = canvasToInput();
  showPreview(input);
  hint.hidden = input !== null;
  schedulePredict(now);
}

function resetInput() {
  clearCanvas();
  input = null;
  testImageShown = false;
  labelEl.hidden = true;
  showPreview(null);
  hint.hidden = false;
}

document.getElementById("clear").addEventListener("click", () => {
  resetInput();
  latestResults = null;
  sequence++;  // an answer still on its way is for the old drawing
  render();
});

// -- random test image -----------------------------------------------------------------------------

document.getElementById("random").addEventListener("click", async () => {
  let body;
  try {
    const response = await fetch("/api/random-test-image");
    body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  } catch (error) {
    labelEl.textContent = `No test image: ${error.message}`;
    labelEl.hidden = false;
    return;
  }
  resetInput();
  input = Float32Array.from(body.image.flat());
  testImageShown = true;
  showPreview(input);
  // The test image, enlarged without smoothing, stands in for a drawing.
  pen.imageSmoothingEnabled = false;
  pen.drawImage(preview, 0, 0, canvas.width, canvas.height);
  hint.hidden = true;
  labelEl.textContent = `MNIST test image #${body.index}, label ${body.label}`;
  labelEl.dataset.label = body.label;
  labelEl.hidden = false;
  schedulePredict(true);
});

// -- asking the targets ----------------------------------------------------------------------------------

function schedulePredict(now) {
  clearTimeout(debounceTimer);
  if (now || performance.now() - lastSentAt > MAX_WAIT_MS) predict();
  else debounceTimer = setTimeout(predict, DEBOUNCE_MS);
}

async function predict() {
  if (input === null) {
    latestResults = null;
    render();
    return;
  }
  if (inFlight) {  // one request at a time; the newest input goes next
    sendAgain = true;
    return;
  }
  inFlight = true;
  lastSentAt = performance.now();
  const mine = ++sequence;
  const image = [];
  for (let y = 0; y < SIDE; y++) {
    image.push(Array.from(input.subarray(y * SIDE, (y + 1) * SIDE), (v) => Math.round(v * 10000) / 10000));
  }
  try {
    const response = await fetch("/api/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image }),
    });
    const body = await response.json();
    if (mine === sequence) {
      latestResults = response.ok ? body.results : { error: body.error || `HTTP ${response.status}` };
      render();
    }
  } catch (error) {
    if (mine === sequence) {
      latestResults = { error: `the page's backend did not answer (${error.message})` };
      render();
    }
  } finally {
    inFlight = false;
    if (sendAgain) {
      sendAgain = false;
      predict();
    }
  }
}

// -- showing the answers -----------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function card(entry, status) {
  const node = el("article", `target ${entry.framework}`);
  node.dataset.target = entry.target;
  node.append(el("h2", "", entry.target));
  const framework = FRAMEWORK_NAMES[entry.framework] || entry.framework;
  const meta = el("div", "meta", `${framework} · ${PROTOCOL_NAMES[entry.protocol] || entry.protocol}`);
  if (status) {
    const state = el("span", `status ${status.ready ? "ready" : "down"}`, status.ready ? " · ready" : " · not ready");
    meta.append(state);
  }
  node.append(meta);
  return node;
}

function bars(probabilities, predicted) {
  const node = el("div", "bars");
  probabilities.forEach((p, digit) => {
    const column = el("div", "bar-col");
    const bar = el("div", digit === predicted ? "bar top" : "bar");
    bar.style.height = `${Math.max(0, Math.min(1, p)) * 100}%`;
    bar.title = `${digit}: ${(p * 100).toFixed(1)}%`;
    bar.dataset.digit = digit;
    column.append(bar, el("span", "digit", String(digit)));
    node.append(column);
  });
  return node;
}

function render() {
  const statusOf = Object.fromEntries(targets.map((t) => [t.target, t]));
  results.replaceChildren();
  if (latestResults && latestResults.error) {
    results.append(el("p", "error", latestResults.error));
    return;
  }
  const entries = latestResults || targets;
  for (const entry of entries) {
    const node = card(entry, statusOf[entry.target]);
    if (entry.error) {
      node.classList.add("down");
      node.append(el("p", "error", `No answer: ${entry.error}`));
    } else if (entry.probabilities) {
      const answer = el("div", "answer");
      const latency = el("span", "latency", `${entry.latency_ms.toFixed(2)} ms`);
      answer.append(el("span", "class", String(entry.class)), latency);
      node.append(answer, bars(entry.probabilities, entry.class));
    } else {
      node.append(el("p", "meta", "Draw a digit to see this target's answer."));
    }
    results.append(node);
  }
}

async function refreshTargets() {
  try {
    const response = await fetch("/api/targets");
    if (response.ok) targets = (await response.json()).targets;
  } catch (error) {
    targets = targets.map((t) => ({ ...t, ready: false }));
  }
  render();
}

// -- the load-test report view -------------------------------------------------------------------------

function fmt(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

async function showReport() {
  const status = document.getElementById("report-status");
  const view = document.getElementById("report");
  let body;
  try {
    const response = await fetch("/api/report/latest");
    body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  } catch (error) {
    status.textContent = error.message;
    status.hidden = false;
    view.hidden = true;
    return;
  }
  status.hidden = true;
  view.hidden = false;
  document.getElementById("report-meta").textContent =
    `${body.file}, created ${body.created}${body.hosts.length ? " on " + body.hosts.join(", ") : ""}. Latencies in ms.`;
  const link = document.getElementById("report-link");
  link.hidden = !body.html;
  if (body.html) link.href = `/reports/${encodeURIComponent(body.html)}`;

  const table = document.getElementById("report-table");
  const percentiles = body.measurements.length ? Object.keys(body.measurements[0].latency_ms) : [];
  const head = ["target", "protocol", "point", "requests", "errors", "req/s", ...percentiles, "accuracy"];
  const header = el("tr");
  head.forEach((h) => header.append(el("th", "", h)));
  table.replaceChildren(header);
  for (const m of body.measurements) {
    const row = el("tr");
    const cells = [m.target, m.protocol, `${m.mode === "open" ? "rate" : "conc"} ${m.point}`, m.requests, m.errors,
      fmt(m.throughput_rps, 1), ...percentiles.map((p) => fmt(m.latency_ms[p], 3)), fmt(m.accuracy, 4)];
    cells.forEach((c) => row.append(el("td", "", String(c))));
    table.append(row);
  }
  // The charts are SVG drawn by the load tester's own HTML printer, text escaped there.
  document.getElementById("report-charts").innerHTML = body.charts.join("\n");
}

// -- views ---------------------------------------------------------------------------------------------

function route() {
  const report = location.hash === "#report";
  document.getElementById("view-draw").hidden = report;
  document.getElementById("view-report").hidden = !report;
  document.getElementById("nav-draw").classList.toggle("active", !report);
  document.getElementById("nav-report").classList.toggle("active", report);
  if (report) showReport();
}

window.addEventListener("hashchange", route);
clearCanvas();
showPreview(null);
route();
refreshTargets();
setInterval(refreshTargets, READY_POLL_MS);
