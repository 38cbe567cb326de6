// pykimi's chat page: plain JavaScript, no build step, nothing fetched from outside this server.
// Chat through POST /v1/chat/completions (OpenAI format, SSE streaming); the inspector through
// POST /pykimi/inspect (pykimi/server/inspector.py). Model and user text is only ever set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  messages: [],        // the conversation in OpenAI format
  pending: [],         // data: URIs attached to the next message
  busy: false,
  abort: null,
  last: null,          // {request: messages sent, answer: text, el: answer element}
  insp: null,          // the last inspector payload
  sel: 0,              // selected answer token
  patch: null,         // vision query patch (null: mean over patches)
  model: "",
};

// ------------------------------------------------------------------------------------------ chat
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function addMessage(role, text, images) {
  const node = $("message-template").content.firstElementChild.cloneNode(true);
  node.classList.add(role);
  node.querySelector(".who").textContent = role === "user" ? "you" : "pykimi";
  const imgs = node.querySelector(".images");
  for (const uri of images || []) {
    const im = el("img");
    im.src = uri;
    im.alt = "attached image";
    imgs.appendChild(im);
  }
  node.querySelector(".text").textContent = text;
  $("messages").appendChild(node);
  node.scrollIntoView({block: "end"});
  return node;
}

function setBusy(b) {
  state.busy = b;
  $("send").disabled = b;
  $("stop").disabled = !b;
}

function status(msg) { $("status").textContent = msg || ""; }

function samplingParams() {
  const p = {};
  const num = (id) => { const v = $(id).value.trim(); return v === "" ? null : Number(v); };
  const t = num("temperature"), tp = num("top-p"), mt = num("max-tokens"), seed = num("seed");
  if (t !== null) p.temperature = t;
  if (tp !== null) p.top_p = tp;
  if (mt !== null) p.max_tokens = Math.trunc(mt);
  if (seed !== null) p.seed = Math.trunc(seed);
  return p;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  try {
    const j = await resp.json();
    if (j && j.error && j.error.message) return j.error.message;
    return JSON.stringify(j);
  } catch (e) {
    return resp.status + " " + resp.statusText;
  }
}

async function send() {
  if (state.busy) return;
  const text = $("prompt").value;
  if (!text.trim() && state.pending.length === 0) return;
  const content = state.pending.map((u) => ({type: "image_url", image_url: {url: u}}));
  if (text.trim()) content.push({type: "text", text: text});
  const userMsg = {role: "user", content: content};
  addMessage("user", text, state.pending);
  state.messages.push(userMsg);
  state.pending = [];
  renderAttachments();
  $("prompt").value = "";
  const request = state.messages.slice();

  const node = addMessage("assistant", "");
  const textEl = node.querySelector(".text");
  const meta = node.querySelector(".meta");
  // the last answer's text is what the tests read: move the marker to this answer
  document.querySelectorAll('[data-testid="answer"]').forEach((e) => e.removeAttribute("data-testid"));
  textEl.setAttribute("data-testid", "answer");
  node.classList.add("streaming");
  setBusy(true);
  status("thinking…");
  const ctrl = new AbortController();
  state.abort = ctrl;
  let answer = "", chunks = 0, first = null, usage = null, timings = null, finish = null;
  const t0 = performance.now();
  try {
    const body = Object.assign({model: state.model || "pykimi", messages: request, stream: true,
                                stream_options: {include_usage: true}}, samplingParams());
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: ctrl.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    outer: for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") break outer;
        let j;
        try { j = JSON.parse(data); } catch (e) { continue; }
        if (j.error) throw new Error(j.error.message || "server error");
        if (j.usage) usage = j.usage;
        if (j.timings) timings = j.timings;
        const ch = (j.choices || [])[0];
        if (ch) {
          const d = (ch.delta && ch.delta.content) || "";
          if (d) {
            if (first === null) first = performance.now();
            chunks += 1;
            answer += d;
            textEl.textContent = answer;
            status("");
          }
          if (ch.finish_reason) finish = ch.finish_reason;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else { meta.textContent = "error: " + e.message; node.classList.add("error"); }
  } finally {
    const t1 = performance.now();
    node.classList.remove("streaming");
    setBusy(false);
    status("");
    state.abort = null;
    const n = usage && usage.completion_tokens ? usage.completion_tokens : chunks;
    let tps = null;
    if (timings && timings.predicted_per_second) tps = timings.predicted_per_second;
    else if (first !== null && n > 1) tps = (n - 1) / ((t1 - first) / 1000);
    if (!node.classList.contains("error")) {
      const parts = [n + " tokens"];
      if (tps !== null) parts.push(tps.toFixed(1) + " tok/s");
      if (first !== null) parts.push("first token " + ((first - t0) / 1000).toFixed(2) + " s");
      if (finish && finish !== "stop") parts.push(finish);
      meta.textContent = parts.join(" · ");
      meta.setAttribute("data-testid", "answer-meta");
    }
    if (answer) {
      state.messages.push({role: "assistant", content: answer});
      state.last = {request: request, answer: answer, el: node};
      const b = el("button", "inspect", "Inspect");
      b.type = "button";
      b.id = "inspect-btn";
      document.querySelectorAll("#inspect-btn").forEach((x) => x.remove());
      b.addEventListener("click", () => openInspector());
      node.appendChild(b);
      if (!$("inspector").hidden) openInspector();   // an open inspector follows the newest answer
    } else {
      // nothing came back: keep the conversation consistent by dropping the unanswered question
      state.messages.pop();
    }
  }
}

function stop() { if (state.abort) state.abort.abort(); }

function newChat() {
  stop();
  state.messages = [];
  state.pending = [];
  state.last = null;
  state.insp = null;
  $("messages").replaceChildren();
  renderAttachments();
  $("inspector").hidden = true;
  $("prompt").value = "";
  $("prompt").focus();
}

// ------------------------------------------------------------------------------------------ images
function readAsDataURI(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function attachFiles(files) {
  for (const f of files) {
    if (!f.type.startsWith("image/")) { status(f.name + ": not an image"); continue; }
    state.pending.push(await readAsDataURI(f));
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.pending.forEach((uri, i) => {
    const w = el("span", "thumb");
    const im = el("img");
    im.src = uri;
    im.alt = "attachment " + (i + 1);
    const x = el("button", "remove", "×");
    x.type = "button";
    x.title = "Remove";
    x.addEventListener("click", () => { state.pending.splice(i, 1); renderAttachments(); });
    w.append(im, x);
    box.appendChild(w);
  });
}

// ------------------------------------------------------------------------------------------ inspector
function ramp(t) {
  // a viridis-like ramp: dark blue -> teal -> yellow; t in [0, 1]
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  t = Math.max(0, Math.min(1, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(t)), f = t - i;
  const a = stops[i], b = stops[i + 1];
  return [0, 1, 2].map((k) => Math.round(a[k] + (b[k] - a[k]) * f));
}

function inspectBody() {
  const sel = (id) => { const v = $(id).value; return v === "" || v === "mean" ? null : Number(v); };
  const b = {messages: state.last.request, answer: state.last.answer,
             vision_block: sel("v-block"), vision_head: sel("v-head"), lm_layer: sel("lm-layer"),
             vision_patch: state.patch};
  const im = sel("image-select");
  if (im !== null) b.image = im;
  return b;
}

async function openInspector() {
  if (!state.last) return;
  $("inspector").hidden = false;
  state.sel = 0;
  state.patch = null;
  await refreshInspector();
}

async function refreshInspector() {
  if (!state.last) return;
  const s = $("insp-status");
  s.textContent = "tracing…";
  $("inspector").classList.add("loading");
  try {
    const resp = await fetch("/pykimi/inspect", {
      method: "POST", headers: headers(), body: JSON.stringify(inspectBody()),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    state.insp = await resp.json();
    if (state.sel >= state.insp.tokens.length) state.sel = 0;
    fillSelectors();
    renderInspector();
    s.textContent = state.insp.prompt_tokens + " prompt + " + state.insp.answer_tokens + " answer tokens" +
      (state.insp.truncated ? " (the first ones of a longer answer)" : "");
  } catch (e) {
    s.textContent = "error: " + e.message;
  } finally {
    $("inspector").classList.remove("loading");
  }
}

function fillSelect(id, values, current, labels) {
  const s = $(id);
  if (s.options.length !== values.length) {
    s.replaceChildren();
    values.forEach((v, i) => { const o = el("option", null, labels ? labels[i] : String(v)); o.value = String(v); s.appendChild(o); });
  }
  s.value = current === null || current === undefined ? String(values[0]) : String(current);
}

function fillSelectors() {
  const d = state.insp;
  const lm = d.lm_attention;
  fillSelect("lm-layer", [...Array(lm.layers).keys()], lm.layer);
  if (d.config_vision) {
    fillSelect("v-block", [...Array(d.config_vision.blocks).keys()], d.vision_attention.block);
    const heads = ["mean"].concat([...Array(d.config_vision.heads).keys()]);
    fillSelect("v-head", heads, d.vision_attention.head === null ? "mean" : d.vision_attention.head,
               heads.map((h) => h === "mean" ? "mean of heads" : String(h)));
  }
  $("image-panels").hidden = !d.image;
  $("image-select-label").hidden = !(d.n_images > 1);
  if (d.n_images > 1) fillSelect("image-select", [...Array(d.n_images).keys()], d.image.index);
}

function renderInspector() {
  const d = state.insp;
  if (!d) return;
  const box = $("tokens");
  box.replaceChildren();
  d.tokens.forEach((t, i) => {
    const b = el("button", "tok" + (i === state.sel ? " sel" : "") + (t.rank > 1 ? " sampled" : ""), t.text);
    b.type = "button";
    b.dataset.index = String(i);
    b.title = "p = " + t.p + (t.rank > 1 ? " (rank " + t.rank + ")" : "");
    b.addEventListener("click", () => { state.sel = i; renderInspector(); });
    box.appendChild(b);
  });
  renderTop(d.tokens[state.sel]);
  renderRouting(d.routing, state.sel);
  renderLMAttention(d, state.sel);
  renderVision(d);
}

function renderTop(t) {
  const body = $("top-tokens").querySelector("tbody");
  body.replaceChildren();
  for (const c of t.top) {
    const tr = el("tr", c.id === t.id ? "chosen" : "");
    const tk = el("td", "tk", JSON.stringify(c.text));
    const bar = el("td", "barcell");
    const fill = el("div", "bar");
    fill.style.width = Math.max(1, Math.round(c.p * 100)) + "%";
    bar.appendChild(fill);
    const p = el("td", "num", (c.p * 100).toFixed(c.p >= 0.01 ? 1 : 3) + " %");
    tr.append(tk, bar, p);
    body.appendChild(tr);
  }
}

function renderRouting(r, i) {
  const cv = $("routing-heatmap");
  const ctx = cv.getContext("2d");
  if (!r.layers.length) {
    cv.width = 300; cv.height = 20;
    ctx.clearRect(0, 0, cv.width, cv.height);
    ctx.fillText("no MoE layers", 4, 14);
    return;
  }
  const E = r.n_experts, S = r.n_shared, L = r.layers.length;
  const labelW = 28, gap = 10, top = 14;
  const cw = Math.max(3, Math.min(22, Math.floor(300 / (E + S))));
  const ch = Math.max(6, Math.min(22, Math.floor(220 / L)));
  cv.width = labelW + cw * E + (S ? gap + Math.max(cw * S, 40) : 0) + 2;
  cv.height = top + ch * L + 2;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, cv.width, cv.height);
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#333";
  ctx.fillText("experts", labelW, 10);
  if (S) ctx.fillText("shared", labelW + cw * E + gap, 10);
  const scores = r.scores[i], chosen = r.chosen[i];
  let hi = 0;
  scores.forEach((row) => row.forEach((v) => { hi = Math.max(hi, v); }));
  r.layers.forEach((layer, j) => {
    const y = top + j * ch;
    ctx.fillStyle = "#333";
    ctx.fillText(String(layer), 2, y + ch - 2);
    for (let e = 0; e < E; e++) {
      const [cr, cg, cb] = ramp(hi > 0 ? scores[j][e] / hi : 0);
      ctx.fillStyle = `rgb(${cr},${cg},${cb})`;
      ctx.fillRect(labelW + e * cw, y, cw - 1, ch - 1);
    }
    for (const e of chosen[j]) {          // the chosen experts: a red frame
      ctx.strokeStyle = "#e0103a";
      ctx.lineWidth = 2;
      ctx.strokeRect(labelW + e * cw + 1, y + 1, cw - 3, ch - 3);
    }
    for (let s = 0; s < S; s++) {         // shared experts: always on, weight 1
      ctx.fillStyle = "#888";
      ctx.fillRect(labelW + E * cw + gap + s * cw, y, cw - 1, ch - 1);
    }
  });
  cv.dataset.token = String(i);
  cv.onmousemove = (ev) => {
    const rect = cv.getBoundingClientRect();
    const x = (ev.clientX - rect.left) * cv.width / rect.width, y = (ev.clientY - rect.top) * cv.height / rect.height;
    const j = Math.floor((y - top) / ch), e = Math.floor((x - labelW) / cw);
    if (j < 0 || j >= L || e < 0) { cv.title = ""; return; }
    if (e < E) {
      const k = chosen[j].indexOf(e);
      cv.title = `layer ${r.layers[j]}, expert ${e}: score ${scores[j][e]}` +
        (k >= 0 ? `, chosen, weight ${r.weights[i][j][k]}` : "");
    } else cv.title = `layer ${r.layers[j]}: shared expert (weight 1)`;
  };
  $("routing-note").textContent = `(${r.scoring} scores, top-${r.k} of ${E} framed in red)`;
  $("routing-legend").textContent = (r.dense_layers.length ? `dense layers: ${r.dense_layers.join(", ")}. ` : "") +
    `Rows: MoE layers; colour: router score (brightest = highest of this token); grey: ${S} shared expert(s), always on.`;
}

function loadPreview(d) {
  // one <img> per preview data URI, decoded once
  if (!d.image) return null;
  if (!state.previewImg || state.previewImg.dataset.uri !== d.image.preview) {
    const im = new Image();
    im.dataset.uri = d.image.preview;
    im.onload = () => renderInspector();
    im.src = d.image.preview;
    state.previewImg = im;
  }
  return state.previewImg.complete && state.previewImg.naturalWidth ? state.previewImg : null;
}

function drawImageWithMap(cv, d, map, cellPx, pool, highlight) {
  const im = loadPreview(d);
  const [pw, ph] = d.image.padded;
  const scale = Math.min(270 / pw, 270 / ph, 3);
  cv.width = Math.round(pw * scale);
  cv.height = Math.round(ph * scale);
  const ctx = cv.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, cv.width, cv.height);
  if (im) ctx.drawImage(im, 0, 0, cv.width, cv.height);
  if (map) {
    let hi = 0;
    map.forEach((row) => row.forEach((v) => { hi = Math.max(hi, v); }));
    const c = cellPx * pool * scale;
    map.forEach((row, y) => row.forEach((v, x) => {
      const t = hi > 0 ? v / hi : 0;
      const [r, g, b] = ramp(t);
      ctx.fillStyle = `rgba(${r},${g},${b},${0.15 + 0.6 * t})`;
      ctx.fillRect(x * c, y * c, c, c);
    }));
  }
  if ($("show-grid").checked) {
    const p = d.image.patch * scale;
    ctx.lineWidth = 1;
    ctx.strokeStyle = "rgba(255,255,255,0.25)";
    ctx.beginPath();
    for (let x = 0; x <= cv.width + 0.5; x += p) { ctx.moveTo(x, 0); ctx.lineTo(x, cv.height); }
    for (let y = 0; y <= cv.height + 0.5; y += p) { ctx.moveTo(0, y); ctx.lineTo(cv.width, y); }
    ctx.stroke();
    const m = d.image.patch * d.image.merge[0] * scale;
    ctx.strokeStyle = "rgba(255,255,255,0.7)";
    ctx.beginPath();
    for (let x = 0; x <= cv.width + 0.5; x += m) { ctx.moveTo(x, 0); ctx.lineTo(x, cv.height); }
    for (let y = 0; y <= cv.height + 0.5; y += m) { ctx.moveTo(0, y); ctx.lineTo(cv.width, y); }
    ctx.stroke();
  }
  if (highlight) {
    const [hy, hx, size] = highlight;
    ctx.strokeStyle = "#e0103a";
    ctx.lineWidth = 2;
    ctx.strokeRect(hx * size * scale, hy * size * scale, size * scale, size * scale);
  }
  return scale;
}

function renderLMAttention(d, i) {
  const cv = $("attention-map");
  const lm = d.lm_attention;
  if (!d.image || !lm.maps) { $("lm-note").textContent = "no image in this conversation"; return; }
  const cell = d.image.patch * d.image.merge[0];
  drawImageWithMap(cv, d, lm.maps[i], cell, lm.pool, null);
  cv.dataset.token = String(i);
  const t = lm.top[i][0];
  $("lm-note").textContent = `token ${JSON.stringify(d.tokens[i].text)}: ${(lm.image_mass[i] * 100).toFixed(1)} % of ` +
    `layer ${lm.layer}'s attention (mean over heads) is on the image; most on image token ${t.token} ` +
    `(row ${t.row}, col ${t.col}). Cells: merged 2×2 tokens; heads summed.`;
}

function renderVision(d) {
  const cv = $("vision-attention-map");
  const va = d.vision_attention;
  if (!d.image || !va) return;
  if (!va.map) { $("v-note").textContent = va.note || ""; return; }
  const gw = va.grid[1];
  const hl = va.patch === null ? null : [Math.floor(va.patch / gw), va.patch % gw, d.image.patch];
  const scale = drawImageWithMap(cv, d, va.map, d.image.patch, va.pool, hl);
  $("v-note").textContent = `block ${va.block}, ${va.head === null ? "mean of heads" : "head " + va.head}, ` +
    (va.patch === null ? "mean over query patches" : `query patch ${va.patch} (framed)`) +
    ". Click a patch to see where it looks.";
  cv.onclick = (ev) => {
    const rect = cv.getBoundingClientRect();
    const x = (ev.clientX - rect.left) * cv.width / rect.width, y = (ev.clientY - rect.top) * cv.height / rect.height;
    const px = d.image.patch * scale;
    const c = Math.floor(x / px), r = Math.floor(y / px);
    if (r < 0 || c < 0 || r >= va.grid[0] || c >= va.grid[1]) return;
    state.patch = r * va.grid[1] + c;
    refreshInspector();
  };
}

// ------------------------------------------------------------------------------------------ wiring
function init() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("image-input").addEventListener("change", async (e) => { await attachFiles([...e.target.files]); e.target.value = ""; });
  document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("drag"); });
  document.addEventListener("dragleave", (e) => { if (!e.relatedTarget) document.body.classList.remove("drag"); });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("drag");
    if (e.dataTransfer && e.dataTransfer.files.length) attachFiles([...e.dataTransfer.files]);
  });
  document.addEventListener("paste", (e) => {
    const files = [...((e.clipboardData && e.clipboardData.items) || [])]
      .filter((it) => it.kind === "file" && it.type.startsWith("image/")).map((it) => it.getAsFile());
    if (files.length) { e.preventDefault(); attachFiles(files); }
  });
  $("insp-close").addEventListener("click", () => { $("inspector").hidden = true; });
  for (const id of ["lm-layer", "v-block", "v-head", "image-select"]) $(id).addEventListener("change", refreshInspector);
  $("v-mean").addEventListener("click", () => { state.patch = null; refreshInspector(); });
  $("show-grid").addEventListener("change", renderInspector);
  $("api-key").value = sessionStorage.getItem("pykimi-api-key") || "";
  $("api-key").addEventListener("change", () => sessionStorage.setItem("pykimi-api-key", $("api-key").value.trim()));
  fetch("/v1/models", {headers: headers()}).then((r) => r.ok ? r.json() : null).then((j) => {
    if (j && j.data && j.data.length) { state.model = j.data[0].id; $("model-name").textContent = state.model; }
  }).catch(() => {});
  $("prompt").focus();
}

init();
