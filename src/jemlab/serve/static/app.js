// jemlab serve: the page's logic. Plain JavaScript, no build step, talks only to this server's /api/*.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, refined: false, busy: false, pending: false, chains: null, chainStep: 0, running: false, generation: 0 };

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; }

// --- drawing ---------------------------------------------------------------------------------------------------
const draw = $("draw");
const pen = draw.getContext("2d");
function clearCanvas() {
  pen.fillStyle = "#000"; pen.fillRect(0, 0, draw.width, draw.height);
  state.refined = false;
}
let last = null;
function point(event) {
  const rect = draw.getBoundingClientRect();
  return [(event.clientX - rect.left) * draw.width / rect.width, (event.clientY - rect.top) * draw.height / rect.height];
}
draw.addEventListener("pointerdown", (event) => {
  last = point(event); draw.setPointerCapture(event.pointerId); stroke(last, last);
});
draw.addEventListener("pointermove", (event) => {
  if (!last) return;
  const next = point(event); stroke(last, next); last = next; schedulePredict();
});
const endStroke = () => { if (last) { last = null; schedulePredict(); } };
draw.addEventListener("pointerup", endStroke);
draw.addEventListener("pointerleave", endStroke);
function stroke(a, b) {
  pen.strokeStyle = "#fff"; pen.lineWidth = 20; pen.lineCap = "round"; pen.lineJoin = "round";
  pen.shadowColor = "#fff"; pen.shadowBlur = 6;
  pen.beginPath(); pen.moveTo(a[0], a[1]); pen.lineTo(b[0], b[1]); pen.stroke();
  pen.shadowBlur = 0;
}

// The drawing → the model's input: a flat C·H·W list in [0, 1]. With "fit" on, the drawing is scaled and placed
// the way the dataset's images are: MNIST digits fit a 20-pixel box and are then shifted so that their centre of
// mass sits at the image centre (as LeCun et al. prepared MNIST); other datasets' objects fill the frame, centred
// by their bounding box.
function modelInput() {
  const [c, h, w] = state.info.image_shape;
  const small = document.createElement("canvas"); small.width = w; small.height = h;
  const ctx = small.getContext("2d");
  const fit = $("fit").checked && !state.refined;
  const mnist = state.info.dataset.startsWith("mnist");
  let box = [0, 0, draw.width, draw.height];
  if (fit) box = boundingBox() || box;
  const [x0, y0, bw, bh] = box;
  const scale = (mnist ? 20 / 28 : 26 / 28) * Math.min(w / bw, h / bh);
  const [dw, dh] = [bw * scale, bh * scale];
  const place = (dx, dy) => {
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, w, h); ctx.imageSmoothingQuality = "high";
    if (fit) ctx.drawImage(draw, x0, y0, bw, bh, dx, dy, dw, dh);
    else ctx.drawImage(draw, 0, 0, w, h);
  };
  let [dx, dy] = [(w - dw) / 2, (h - dh) / 2];
  place(dx, dy);
  if (fit && mnist) {
    const [cx, cy] = centreOfMass(ctx.getImageData(0, 0, w, h).data, w, h);
    if (cx !== null) { dx += Math.round(w / 2 - cx); dy += Math.round(h / 2 - cy); place(dx, dy); }
  }
  const rgba = ctx.getImageData(0, 0, w, h).data;
  const pixels = new Array(c * h * w);
  for (let ch = 0; ch < c; ch++)
    for (let i = 0; i < h * w; i++) pixels[ch * h * w + i] = rgba[4 * i + (c === 1 ? 0 : ch)] / 255;
  return pixels;
}
// Intensity-weighted centre of the red channel (pixel centres at x + 0.5), or [null, null] for a blank image.
function centreOfMass(rgba, w, h) {
  let [total, sx, sy] = [0, 0, 0];
  for (let y = 0; y < h; y++)
    for (let x = 0; x < w; x++) { const v = rgba[4 * (y * w + x)]; total += v; sx += v * (x + 0.5); sy += v * (y + 0.5); }
  return total > 0 ? [sx / total, sy / total] : [null, null];
}
function boundingBox() {
  const data = pen.getImageData(0, 0, draw.width, draw.height).data;
  let [x0, y0, x1, y1] = [draw.width, draw.height, -1, -1];
  for (let y = 0; y < draw.height; y++)
    for (let x = 0; x < draw.width; x++)
      if (data[4 * (y * draw.width + x)] > 40) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  if (x1 < 0) return null;
  const side = Math.max(x1 - x0, y1 - y0) + 1;  // keep the aspect ratio: a square box around the drawing
  return [(x0 + x1 - side) / 2, (y0 + y1 - side) / 2, side, side];
}

// Paint a flat [0, 1] image onto a canvas of any size (nearest neighbour).
function paint(canvas, pixels) {
  const [c, h, w] = state.info.image_shape;
  const small = document.createElement("canvas"); small.width = w; small.height = h;
  const ctx = small.getContext("2d");
  const image = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    for (let k = 0; k < 3; k++) image.data[4 * i + k] = 255 * pixels[(c === 1 ? 0 : k) * h * w + i];
    image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  const target = canvas.getContext("2d");
  target.imageSmoothingEnabled = false;
  target.drawImage(small, 0, 0, canvas.width, canvas.height);
}

// --- prediction ------------------------------------------------------------------------------------------------
function schedulePredict() {
  if (state.busy) { state.pending = true; return; }
  state.busy = true;
  const pixels = modelInput();
  paint($("seen"), pixels);
  api("/api/predict", { pixels }).then(showPrediction).catch(showError).finally(() => {
    state.busy = false;
    if (state.pending) { state.pending = false; setTimeout(schedulePredict, 30); }
  });
}

function showPrediction(p) {
  showError(null);
  const names = state.info.class_names;
  $("bars").innerHTML = "";
  p.probs.forEach((prob, i) => {
    const bar = document.createElement("div");
    bar.className = "bar" + (i === p.predicted ? " top" : "");
    bar.innerHTML = `<span class="name"></span><span class="track"><span class="fill"></span></span><span class="value"></span>`;
    bar.querySelector(".name").textContent = names[i];
    bar.querySelector(".fill").style.width = `${(100 * prob).toFixed(1)}%`;
    bar.querySelector(".value").textContent = `${(100 * prob).toFixed(1)}%`;
    $("bars").appendChild(bar);
  });
  $("bars").dataset.predicted = names[p.predicted];
  $("energy").textContent = p.energy === null ? "not finite" : p.energy.toFixed(3);
  $("grad-norm").textContent = p.grad_norm === null ? "–" : p.grad_norm.toFixed(3);
  $("percentile").textContent = p.percentile === null ? "–" : `${(100 * p.percentile).toFixed(1)}%`;
  $("grad-percentile").textContent = p.grad_percentile === null ? "–" : `${(100 * p.grad_percentile).toFixed(1)}%`;
  const verdict = $("verdict");
  verdict.className = `verdict ${p.verdict}`;
  verdict.textContent = p.verdict === "unknown" ? "unknown (no reference set)"
    : p.verdict + (p.reasons && p.reasons.length ? ` (${p.reasons.join(", ")})` : "");
}

// --- refine: SGLD on the drawing, animated -----------------------------------------------------------------------
async function refine() {
  const steps = Number($("refine-steps").value);
  const label = $("refine-label").value === "" ? null : Number($("refine-label").value);
  $("refine").disabled = true;
  $("refine-status").textContent = "running…";
  try {
    const result = await api("/api/refine", { pixels: modelInput(), steps, frames: Math.min(20, steps), label, seed: Date.now() % 100000 });
    for (const frame of result.frames) {
      paint(draw, frame.pixels); paint($("seen"), frame.pixels); showPrediction(frame);
      $("refine-status").textContent = `step ${frame.step}/${result.steps}`;
      await new Promise((resolve) => setTimeout(resolve, 120));
    }
    state.refined = true;  // the canvas now holds the model's own image: do not re-fit it
  } catch (err) { showError(err); }
  $("refine").disabled = false;
}

// --- live chains from noise ------------------------------------------------------------------------------------
function chainGrid(n, labels) {
  const grid = $("chains"); grid.innerHTML = "";
  for (let i = 0; i < n; i++) {
    const cell = document.createElement("div"); cell.className = "chain-cell";
    const canvas = document.createElement("canvas"); canvas.className = "chain"; canvas.width = 64; canvas.height = 64;
    const caption = document.createElement("div");
    caption.textContent = labels ? state.info.class_names[labels[i]] : `chain ${i + 1}`;
    cell.append(canvas, caption); grid.appendChild(cell);
  }
}
async function chainTick() {
  if (!state.running) return;
  const generation = state.generation;
  const mode = $("chain-mode").value;
  const body = { mode, steps: state.chains ? 5 : 0, seed: Date.now() % 100000 };
  if (mode === "unconditional") body.n = 8;
  if (state.chainId) body.chain_id = state.chainId;  // diffusion models keep their noisy chains on the server
  else if (state.chains) body.images = state.chains;
  try {
    const result = await api("/api/chains", body);
    if (generation !== state.generation) { setTimeout(chainTick, 0); return; }  // restarted meanwhile
    if (!state.chains) chainGrid(result.images.length, result.labels);
    state.chains = result.images; state.chainStep += result.steps; state.chainId = result.chain_id || null;
    const canvases = $("chains").querySelectorAll("canvas");
    result.images.forEach((pixels, i) => paint(canvases[i], pixels));
    $("chain-step").textContent = state.chainStep;
    const mean = result.energy.reduce((a, b) => a + b, 0) / result.energy.length;
    $("chain-energy").textContent = mean.toFixed(3);
    setTimeout(chainTick, 60);
  } catch (err) { showError(err); state.running = false; $("chain-run").textContent = "Run"; }
}
function resetChains() { state.generation += 1; state.chains = null; state.chainId = null; state.chainStep = 0; $("chain-step").textContent = "0"; }

// --- start-up --------------------------------------------------------------------------------------------------
async function start() {
  clearCanvas();
  try {
    state.info = await api("/api/info");
  } catch (err) { showError(err); return; }
  const info = state.info;
  const ref = info.reference;
  $("model-info").textContent = `${info.kind.toUpperCase()} · ${info.dataset} · ${info.checkpoint} · images ${info.image_shape.join("×")}`;
  $("reference-note").textContent = ref
    ? `Verdict: out of distribution when the drawing's log p(x) or its gradient norm is in the most extreme ` +
      `${50 * info.ood_quantile}% of ${ref.source} (model accuracy on them: ${(100 * ref.accuracy).toFixed(1)}%), ` +
      `so at most ${100 * info.ood_quantile}% of real test images would be called out of distribution.`
    : info.reference_note;
  const s = info.sampler;
  $("sampler-note").textContent = info.kind === "egc"
    ? `${s.sampler} with ${s.steps} steps (η = ${s.eta}, ${s.schedule}, classifier guidance ${s.guidance}); chains ` +
      `start from ${s.init} and stop changing after ${s.steps} steps; "refine" re-noises the drawing and denoises it.`
    : `${s.sampler}: step size ${s.step_size}, noise ${s.noise}` +
      (s.grad_clamp ? `, gradient clipped to ±${s.grad_clamp}` : "") + `; chains start from the model's "${s.init}" initialiser.`;
  info.class_names.forEach((name, i) => {
    const option = document.createElement("option"); option.value = i; option.textContent = `p(x|${name})`;
    $("refine-label").appendChild(option);
  });
  $("refine-steps").max = info.limits.max_refine_steps;
  $("refine-steps").addEventListener("input", () => { $("refine-steps-value").textContent = $("refine-steps").value; });
  $("clear").addEventListener("click", () => { clearCanvas(); schedulePredict(); });
  $("refine").addEventListener("click", refine);
  $("fit").addEventListener("change", schedulePredict);
  $("chain-run").addEventListener("click", () => {
    state.running = !state.running;
    $("chain-run").textContent = state.running ? "Pause" : "Run";
    if (state.running) chainTick();
  });
  $("chain-reset").addEventListener("click", resetChains);
  $("chain-mode").addEventListener("change", resetChains);
  document.body.dataset.ready = "true";
}
start();
