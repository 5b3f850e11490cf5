// stemagent live view: long-polls /api/snapshot and draws it; controls post to /api/control.
"use strict";
// latencies_ms: a frame's arrival at the agent to the page having painted it (ready_latencies_ms:
// from the end of its analysis); both on the machine's wall clock, read after the paint
const view = (window.stemagentView = { seq: -1, draws: 0, latencies_ms: [], ready_latencies_ms: [], painted: [], acks: [], doc: null, errors: 0 });
const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
const COLORS = ["#4fc3f7", "#ff5252", "#ffd740", "#69f0ae", "#e040fb", "#ff9100", "#b0bec5"];
const $ = (id) => document.getElementById(id);
const canvas = $("frame");
const ctx = canvas.getContext("2d");
const off = document.createElement("canvas");
let lastImage = null;
let nControl = 0;
let playing = null;

function fmt(v, d = 3) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-2 && v !== 0) ? v.toExponential(2) : v.toFixed(d).replace(/\.?0+$/, "");
}

function drawImage(frame) {
  if (frame.image_b64 !== lastImage) {
    const bytes = atob(frame.image_b64);
    off.width = frame.width; off.height = frame.height;
    const octx = off.getContext("2d");
    const img = octx.createImageData(frame.width, frame.height);
    for (let i = 0, j = 0; i < bytes.length; i++, j += 4) {
      const v = bytes.charCodeAt(i);
      img.data[j] = v; img.data[j + 1] = v; img.data[j + 2] = v; img.data[j + 3] = 255;
    }
    octx.putImageData(img, 0, 0);
    lastImage = frame.image_b64;
  }
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(off, 0, 0, canvas.width, canvas.height);
}

function drawFrame(doc) {
  const f = doc.frame;
  if (!f) return;
  drawImage(f);
  const sx = canvas.width / f.width, sy = canvas.height / f.height;
  const X = (c) => (c + 0.5) * sx, Y = (r) => (r + 0.5) * sy;
  const atoms = doc.atoms;
  if (atoms) {
    // a circle of 0.45 Å (an atom's size on screen), 3..12 canvas px
    const A_per_px = Math.hypot(f.px_to_A[0][0], f.px_to_A[1][0]) || 1;
    const r = Math.min(12, Math.max(3, (0.45 / A_per_px) * sx));
    ctx.lineWidth = 1.5;
    for (let i = 0; i < atoms.col_row.length; i++) {
      const [c, rr] = atoms.col_row[i];
      ctx.strokeStyle = COLORS[atoms.classes[i] % COLORS.length];
      ctx.beginPath(); ctx.arc(X(c), Y(rr), r, 0, 2 * Math.PI); ctx.stroke();
    }
    $("legend").innerHTML = atoms.class_names.map((n, k) => `<span style="color:${COLORS[k % COLORS.length]}">● ${n}</span>`).join("")
      + ` <span>${atoms.col_row.length} atoms</span>`;
  }
  const cmd = doc.decision && doc.decision.command;
  ctx.lineWidth = 2;
  if (cmd && cmd.kind === "scan" && cmd.corners && cmd.corners.length === 4) {
    ctx.strokeStyle = "#ffeb3b"; ctx.setLineDash([6, 4]); ctx.beginPath();
    cmd.corners.forEach(([c, r], k) => (k ? ctx.lineTo(X(c), Y(r)) : ctx.moveTo(X(c), Y(r))));
    ctx.closePath(); ctx.stroke(); ctx.setLineDash([]);
    const mc = cmd.corners.reduce((s, [c]) => s + c, 0) / 4, mr = cmd.corners.reduce((s, [, r]) => s + r, 0) / 4;
    offFrameArrow(X(mc), Y(mr), "#ffeb3b", "next scan");
  } else if (cmd && cmd.kind === "park" && cmd.at) {
    const [c, r] = cmd.at;
    ctx.strokeStyle = "#ff1744"; ctx.beginPath();
    ctx.moveTo(X(c) - 10, Y(r)); ctx.lineTo(X(c) + 10, Y(r)); ctx.moveTo(X(c), Y(r) - 10); ctx.lineTo(X(c), Y(r) + 10);
    ctx.stroke(); ctx.beginPath(); ctx.arc(X(c), Y(r), 6, 0, 2 * Math.PI); ctx.stroke();
  }
  if (doc.target_A) {
    const cr = toDisplay(f, doc.target_A);
    if (cr) { ctx.strokeStyle = "#00e5ff"; ctx.strokeRect(X(cr[0]) - 6, Y(cr[1]) - 6, 12, 12); offFrameArrow(X(cr[0]), Y(cr[1]), "#00e5ff", "target"); }
  }
  ctx.lineWidth = 1;
}

function offFrameArrow(x, y, colour, label) {  // a target off the canvas: an arrow at its edge towards it
  const W = canvas.width, H = canvas.height, cx = W / 2, cy = H / 2;
  if (x >= 0 && x <= W && y >= 0 && y <= H) return;
  const dx = x - cx, dy = y - cy, t = Math.min(dx ? (W / 2 - 14) / Math.abs(dx) : Infinity, dy ? (H / 2 - 14) / Math.abs(dy) : Infinity);
  const ex = cx + dx * t, ey = cy + dy * t, a = Math.atan2(dy, dx);
  ctx.save(); ctx.translate(ex, ey); ctx.rotate(a);
  ctx.fillStyle = colour; ctx.beginPath(); ctx.moveTo(12, 0); ctx.lineTo(-8, -8); ctx.lineTo(-8, 8); ctx.closePath(); ctx.fill();
  ctx.restore();
  ctx.font = "12px sans-serif"; ctx.fillStyle = colour; ctx.textAlign = ex > cx ? "right" : "left";
  ctx.fillText(label, ex + (ex > cx ? -16 : 16), ey + (ey > cy ? -10 : 18)); ctx.textAlign = "left";
}

function toDisplay(f, xy) {  // inverse of px_to_A
  const [[a, b, c], [d, e, g]] = f.px_to_A;
  const det = a * e - b * d;
  if (!det) return null;
  const x = xy[0] - c, y = xy[1] - g;
  return [(e * x - b * y) / det, (-d * x + a * y) / det];
}

function drawDose(dose) {
  if (!dose) return;
  const frac = dose.budget_e_per_A2 > 0 ? dose.peak_e_per_A2 / dose.budget_e_per_A2 : 0;
  $("dosefill").style.width = `${Math.min(100, 100 * frac)}%`;
  $("dosefill").style.background = frac > 0.8 ? "#c33" : frac > 0.5 ? "#c90" : "#3a8";
  $("dosetext").textContent = `peak ${fmt(dose.peak_e_per_A2)} of budget ${fmt(dose.budget_e_per_A2)} e/Å² (${fmt(100 * frac, 1)} %)`;
  const m = dose.map, dc = $("dosemap"), dx = dc.getContext("2d");
  dx.fillStyle = "#000"; dx.fillRect(0, 0, dc.width, dc.height);
  if (!m) return;
  const w = dc.width / m.cols, h = dc.height / m.rows;
  let top = 0;
  for (const row of m.fraction) for (const v of row) top = Math.max(top, v);
  $("dosemaptext").textContent = `dose map (allowed area), colour scaled to its peak: ${fmt(100 * top, 2)} % of the budget`;
  for (let i = 0; i < m.rows; i++) for (let j = 0; j < m.cols; j++) {
    const v = top > 0 ? m.fraction[i][j] / top : 0;
    if (v <= 0) continue;
    dx.fillStyle = `rgb(${Math.round(255 * Math.min(1, 2 * v))},${Math.round(255 * Math.max(0, 1 - 2 * Math.abs(v - 0.5)))},${Math.round(80 * (1 - v))})`;
    dx.fillRect(j * w, dc.height - (i + 1) * h, w, h);  // rows along +y: drawn upwards
    if (m.fraction[i][j] >= 0.8) { dx.strokeStyle = "#f00"; dx.strokeRect(j * w, dc.height - (i + 1) * h, w, h); }
  }
}

function drawDrift(drift) {
  const dc = $("drift"), dx = dc.getContext("2d");
  dx.fillStyle = "#111"; dx.fillRect(0, 0, dc.width, dc.height);
  if (!drift || !drift.trace.length) { $("drifttext").textContent = "no drift stage"; return; }
  const t = drift.trace, n = t.length;
  // scale on the displacement and the typical band (a first estimate's wide band is clipped)
  const bands = t.map((row) => row[3]).sort((p, q) => p - q), band = bands[Math.floor(bands.length / 2)];
  let lim = 0.1;
  for (const [, x, y] of t) lim = Math.max(lim, Math.abs(x) + band, Math.abs(y) + band);
  lim *= 1.1;
  const X = (i) => (n > 1 ? (i / (n - 1)) * (dc.width - 10) + 5 : dc.width / 2), Y = (v) => dc.height / 2 - (v / lim) * (dc.height / 2 - 5);
  [[1, "#4fc3f7"], [2, "#ffd740"]].forEach(([k, col]) => {
    dx.fillStyle = col + "33"; dx.beginPath();
    t.forEach((row, i) => (i ? dx.lineTo(X(i), Y(row[k] + row[3])) : dx.moveTo(X(i), Y(row[k] + row[3]))));
    for (let i = n - 1; i >= 0; i--) dx.lineTo(X(i), Y(t[i][k] - t[i][3]));
    dx.fill();
    dx.strokeStyle = col; dx.beginPath();
    t.forEach((row, i) => (i ? dx.lineTo(X(i), Y(row[k])) : dx.moveTo(X(i), Y(row[k]))));
    dx.stroke();
  });
  dx.strokeStyle = "#555"; dx.beginPath(); dx.moveTo(0, Y(0)); dx.lineTo(dc.width, Y(0)); dx.stroke();
  const last = t[n - 1];
  $("drifttext").innerHTML = `<span style="color:#4fc3f7">dx ${fmt(last[1])} Å</span>, <span style="color:#ffd740">dy ${fmt(last[2])} Å</span>`
    + ` at frame ${last[0]}, 95 % band ±${fmt(last[3])} Å (${n} frames, scale ±${fmt(lim, 2)} Å)`;
}

function setHTML(id, html) {  // only touch the DOM when the content changed
  const el = $(id);
  if (el._html !== html) { el.innerHTML = html; el._html = html; }
}

function esc(s) { return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]); }

function render(doc) {
  view.doc = doc;
  $("mode").textContent = doc.mode === "replay" ? "run-log replay" : "live";
  const st = $("state"); st.textContent = doc.state; st.className = `state ${doc.state}`;
  $("progress").textContent = doc.frames_done !== undefined ? `frame ${doc.frame ? doc.frame.index : "–"} · ${doc.frames_done}/${doc.max_frames} done` : "";
  $("run").textContent = doc.run || "";
  drawFrame(doc);
  const d = doc.decision;
  if (d) {
    const c = d.command || {};
    const what = c.kind === "scan" ? `scan ${fmt(c.fov_A[0])}×${fmt(c.fov_A[1])} Å at (${fmt(c.center_A[0])}, ${fmt(c.center_A[1])})`
      : c.kind === "park" ? `park ${fmt(c.dwell_s)} s at (${fmt(c.position_A[0])}, ${fmt(c.position_A[1])}) Å` : c.kind;
    const scores = Object.entries(d.scores || {}).map(([k, v]) => `${esc(k)} ${fmt(v)}`).join(", ");
    $("decision").innerHTML = `<b>${esc(what)}</b><br>${esc(d.policy)}: ${esc(d.reason || "")}${scores ? `<br>scores: ${scores}` : ""}`;
  } else $("decision").textContent = "–";
  drawDose(doc.dose);
  drawDrift(doc.drift);
  const r = doc.rates || {}, tm = doc.timings_ms || {};
  const rows = [["frames/s", fmt(r.frames_per_s, 2)], ["frame→command (last)", `${fmt(r.latency_ms, 1)} ms`],
    ["frame→command (p50)", `${fmt(r.latency_ms_p50, 1)} ms`], ["frames dropped", fmt(r.frames_dropped)],
    ...Object.entries(tm).map(([k, v]) => [`${k}`, `${fmt(v, 1)} ms`])];
  if (view.latencies_ms.length) rows.push(["page update (last)", `${fmt(view.latencies_ms[view.latencies_ms.length - 1], 1)} ms`]);
  setHTML("rates", rows.map(([k, v]) => `<tr><td>${esc(k)}</td><td>${esc(v)}</td></tr>`).join(""));
  setHTML("events", (doc.events || []).slice().reverse()
    .map((e) => `<li class="${esc(e.kind)}">${e.wall_s ? new Date(e.wall_s * 1000).toLocaleTimeString() + " " : ""}${esc(e.kind)}: ${esc(e.text)}</li>`).join(""));
  const isReplay = doc.mode === "replay";
  $("controls").hidden = isReplay;
  $("stepper").hidden = !isReplay;
  if (isReplay && doc.replay) {
    $("slider").max = Math.max(0, doc.replay.count - 1);
    $("slider").value = doc.replay.index;
    $("stepinfo").textContent = `observation ${doc.replay.index + 1} of ${doc.replay.count}`;
  }
}

async function poll() {
  for (;;) {
    try {
      const res = await fetch(`/api/snapshot?after=${view.seq}`, { cache: "no-store" });
      if (res.status === 200) {
        const doc = await res.json();
        view.seq = doc.seq;
        render(doc);
        $("problem").textContent = "";
        view.draws++;
        // a new frame's document (not a status change), and not the first after the page opened
        // (that frame may be from before the page was there): frame-to-screen latency, taken
        // after the paint (a task queued from requestAnimationFrame runs once the frame is painted)
        const fresh = doc.mode === "live" && doc.arrived_wall_s && doc.ready_wall_s !== view.lastReady;
        if (fresh && view.draws > 1) {
          const arrived = doc.arrived_wall_s, ready = doc.ready_wall_s, index = doc.frame ? doc.frame.index : -1;
          requestAnimationFrame(() => setTimeout(() => {
            const now = Date.now();
            view.latencies_ms.push(now - arrived * 1000);
            view.ready_latencies_ms.push(now - ready * 1000);
            view.painted.push(index);
            for (const k of ["latencies_ms", "ready_latencies_ms", "painted"]) if (view[k].length > 5000) view[k].shift();
          }, 0));
        }
        view.lastReady = doc.ready_wall_s;
      } else if (res.status !== 204) {
        view.errors++;
        let why = `HTTP ${res.status}`;
        try { why = (await res.json()).error || why; } catch (err) { /* not JSON: the status says it */ }
        $("problem").textContent = `the page could not be updated: ${why}`;
        await new Promise((ok) => setTimeout(ok, 1000));
      }
    } catch (err) {
      view.errors++;
      $("state").textContent = "disconnected"; $("state").className = "state faulted";
      await new Promise((ok) => setTimeout(ok, 1000));
    }
  }
}

async function control(command, extra = {}) {
  const msg = { command, id: `view-${++nControl}`, reason: "from the live view", ...extra };
  let text;
  try {
    const res = await fetch("/api/control", { method: "POST", headers: { "Content-Type": "application/json", "X-Stemagent-Token": token }, body: JSON.stringify(msg) });
    const body = await res.json();
    view.acks.push({ status: res.status, ...body });
    text = res.status === 401 || res.status === 403 ? `${command}: refused (${body.error})`
      : `${command} (${body.id}): ${body.accepted ? "accepted" : "refused"}, state ${body.state}${body.detail ? ": " + body.detail : ""}`;
  } catch (err) { text = `${command}: ${err}`; }
  $("acks").textContent = text;
}

$("pause").onclick = () => control("pause");
$("resume").onclick = () => control("resume");
$("stop").onclick = () => control("stop");
$("abort").onclick = () => { if (confirm("Abort the run now (blank and end)?")) control("abort"); };
canvas.onclick = (ev) => {
  const doc = view.doc;
  if (!doc || !doc.frame || doc.mode !== "live") return;
  const f = doc.frame, rect = canvas.getBoundingClientRect();
  const col = ((ev.clientX - rect.left) / rect.width) * f.width - 0.5, row = ((ev.clientY - rect.top) / rect.height) * f.height - 0.5;
  const [[a, b, c], [d, e, g]] = f.px_to_A;
  control("set_target", { target_A: [a * col + b * row + c, d * col + e * row + g] });
};

async function step(index) {
  await fetch("/api/step", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ index }) });
}
const current = () => (view.doc && view.doc.replay ? view.doc.replay.index : 0);
$("prev").onclick = () => step(Math.max(0, current() - 1));
$("next").onclick = () => step(current() + 1);
$("slider").oninput = (ev) => step(Number(ev.target.value));
$("play").onclick = () => {
  if (playing) { clearInterval(playing); playing = null; $("play").textContent = "Play"; return; }
  $("play").textContent = "Pause";
  playing = setInterval(() => {
    const r = view.doc && view.doc.replay;
    if (!r || r.index + 1 >= r.count) { clearInterval(playing); playing = null; $("play").textContent = "Play"; return; }
    step(r.index + 1);
  }, 300);
};
poll();
