// marlgrc dashboard: draws the snapshots the server pushes (server-sent events on /events) with
// plain SVG; no library, no network access beyond this server. The server's state.py documents
// which event each figure comes from.
"use strict";

// Okabe-Ito colours: an agent keeps its colour (its place in run.started) in every chart.
const AGENT_COLOURS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"];
const TEAM_COLOUR = "#1f2933";
const W = 460, H = 230, PAD = { l: 54, r: 12, t: 24, b: 36 };

let selected = decodeURIComponent((location.hash.match(/run=([^&]+)/) || [])[1] || "") || null;
let source = null;

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1000) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 0.01 || a === 0) return v.toFixed(3);
  return v.toExponential(2);
}

function when(us) {
  return us ? new Date(us / 1000).toLocaleTimeString() : "–";
}

function niceStep(range, count) {
  const raw = range / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
}

// Tick values and their labels (as many decimals as the step needs).
function ticks(lo, hi, count, integers) {
  let step = niceStep(hi - lo, count);
  if (integers) step = Math.max(1, Math.round(step));
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9)), out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    out.push({ v: +v.toPrecision(12), label: v.toFixed(decimals) });
  }
  return out;
}

function agentColour(agents, a) {
  const i = agents.indexOf(a);
  return AGENT_COLOURS[(i < 0 ? agents.length : i) % AGENT_COLOURS.length];
}

// A line chart: o = {series: [{name, colour, points: [[x, y], ...]}], xLabel, yLabel, yMin, yMax, empty}.
// The svg carries data-points (points drawn) and data-series (series with points) for tests and tools.
function lineChart(svg, o) {
  const series = o.series.map((s) => ({ ...s, points: (s.points || []).filter((p) => p[1] !== null) }));
  const pts = series.flatMap((s) => s.points);
  svg.dataset.points = pts.length;
  svg.dataset.series = series.filter((s) => s.points.length).length;
  if (!pts.length) {
    svg.innerHTML = `<text class="empty" x="${W / 2}" y="${H / 2}" text-anchor="middle">${esc(o.empty)}</text>`;
    return;
  }
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
  if (o.yMin !== undefined) y0 = Math.min(o.yMin, y0); else y0 -= (y1 - y0) * 0.05;
  if (o.yMax !== undefined) y1 = Math.max(o.yMax, y1); else y1 += (y1 - y0) * 0.05;
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const X = (x) => PAD.l + (x - x0) / (x1 - x0) * (W - PAD.l - PAD.r);
  const Y = (y) => H - PAD.b - (y - y0) / (y1 - y0) * (H - PAD.t - PAD.b);
  const parts = [];
  for (const t of ticks(y0, y1, 5, false)) {
    parts.push(`<line class="grid" x1="${PAD.l}" x2="${W - PAD.r}" y1="${Y(t.v)}" y2="${Y(t.v)}"/>`,
      `<text x="${PAD.l - 4}" y="${Y(t.v) + 3}" text-anchor="end">${t.label}</text>`);
  }
  for (const t of ticks(x0, x1, 6, true)) {   // x: episodes, updates, credits counted
    if (t.v < x0 || t.v > x1) continue;
    parts.push(`<line class="axis" x1="${X(t.v)}" x2="${X(t.v)}" y1="${H - PAD.b}" y2="${H - PAD.b + 4}"/>`,
      `<text x="${X(t.v)}" y="${H - PAD.b + 14}" text-anchor="middle">${t.label}</text>`);
  }
  parts.push(`<line class="axis" x1="${PAD.l}" x2="${W - PAD.r}" y1="${H - PAD.b}" y2="${H - PAD.b}"/>`,
    `<line class="axis" x1="${PAD.l}" x2="${PAD.l}" y1="${PAD.t}" y2="${H - PAD.b}"/>`,
    `<text x="${(PAD.l + W - PAD.r) / 2}" y="${H - 4}" text-anchor="middle">${esc(o.xLabel)}</text>`,
    `<text transform="translate(12 ${(PAD.t + H - PAD.b) / 2}) rotate(-90)" text-anchor="middle">${esc(o.yLabel)}</text>`);
  let lx = PAD.l;
  for (const s of series) {
    if (!s.points.length) continue;
    const d = s.points.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    parts.push(`<polyline fill="none" stroke="${s.colour}" stroke-width="1.6" points="${d}" data-name="${esc(s.name)}"/>`);
    if (s.points.length <= 60) {
      for (const p of s.points) parts.push(`<circle r="2.2" fill="${s.colour}" cx="${X(p[0]).toFixed(1)}" cy="${Y(p[1]).toFixed(1)}"><title>${esc(s.name)}: ${fmt(p[1])} at ${fmt(p[0])}</title></circle>`);
    }
    if (series.length > 1 || o.legend) {
      parts.push(`<rect x="${lx}" y="6" width="9" height="9" fill="${s.colour}"/>`,
        `<text x="${lx + 12}" y="14">${esc(s.name)}</text>`);
      lx += 18 + 6.2 * String(s.name).length;
    }
  }
  svg.innerHTML = parts.join("");
}

function tierBars(el, tiers, agents) {
  if (!tiers) {
    el.dataset.tiers = 0;
    el.innerHTML = `<p class="hint">No decision tier recorded in this run's joint actions.</p>`;
    return;
  }
  const max = Math.max(...tiers.tiers.map((t) => tiers.totals[t]), 1);
  const rows = tiers.tiers.map((t) => {
    const segs = tiers.agents.map((a) => {
      const n = tiers.counts[t][a] || 0;
      return n ? `<div class="seg" style="width:${100 * n / max}%;background:${agentColour(agents, a)}" title="${esc(a)}: ${n}"></div>` : "";
    }).join("");
    return `<div class="bar" data-tier="${esc(t)}" data-total="${tiers.totals[t]}"><span class="label">${esc(t)}</span>` +
      `<div class="track">${segs}</div><span class="count">${tiers.totals[t]}</span></div>`;
  });
  const legend = tiers.agents.map((a) => `<span><i style="background:${agentColour(agents, a)}"></i>${esc(a)}</span>`).join("");
  el.dataset.tiers = tiers.tiers.length;
  el.innerHTML = rows.join("") + `<div class="legend">${legend} <span class="hint">decisions (agent actions)</span></div>`;
}

function pill(el, text, cls) {
  el.textContent = text;
  el.className = "pill " + (cls || "");
}

const STATUS_CLASS = { running: "pending", completed: "ok", failed: "bad", interrupted: "bad" };
const VERDICT_CLASS = { verified: "ok", broken: "bad", pending: "pending" };

function verdictText(v) {
  if (!v.chains) return "none";
  if (v.status === "broken") return `BROKEN (${v.broken_chains} of ${v.chains} chains)`;
  if (v.status === "verified") return v.pending_events > 0 ? `verified, ${v.pending_events} newer` : "verified";
  return "not verified yet";
}

// A chain's id without its run's prefix (the run is named above the table); the full id in the title.
function shortChain(id, runId) {
  return runId && id.startsWith(runId + ":") ? id.slice(runId.length) : id;
}

function chainRow(c, runId) {
  return `<tr class="chain-row" data-topic="${esc(c.topic)}" data-chain="${esc(c.chain_id)}" data-events="${c.events}" ` +
    `data-last-seq="${c.last_seq}" data-verified-last-seq="${c.verified_last_seq ?? ""}" ` +
    `data-signed-through="${c.signed_through_seq ?? ""}" data-status="${c.status}">` +
    `<td>${esc(c.topic)}</td><td class="chain" title="${esc(c.chain_id)}">${esc(shortChain(c.chain_id, runId))}</td>` +
    `<td class="num">${c.events}</td><td class="num">${c.last_seq}</td><td class="num">${c.signed_through_seq ?? "–"}</td>` +
    `<td class="status-${c.status}"><b>${esc(c.status)}</b> <span class="detail">${esc(c.detail)}</span></td></tr>`;
}

// The chains of a table: data chains first; the checkpoint chains (one per writer, many for a trainer's
// batches) behind a summary row that opens them, open by themselves when one is not ok.
const openCheckpoints = {};
function chainRows(table, rows, runId) {
  const data = rows.filter((c) => c.topic !== "marl.audit.checkpoints");
  const cps = rows.filter((c) => c.topic === "marl.audit.checkpoints");
  const [body, cpBody] = table.tBodies;
  body.innerHTML = data.length ? data.map((c) => chainRow(c, runId)).join("") :
    (cps.length ? "" : `<tr><td colspan="6" class="hint">none</td></tr>`);
  if (!cps.length) { cpBody.innerHTML = ""; return; }
  const bad = cps.filter((c) => c.status !== "ok").length;
  const open = openCheckpoints[table.id] || bad > 0;
  cpBody.innerHTML = `<tr class="toggle"><td colspan="6">${open ? "▾" : "▸"} ${cps.length} checkpoint chain(s): ` +
    `${cps.length - bad} ok${bad ? `, <b class="status-broken">${bad} not ok</b>` : ""}</td></tr>` +
    cps.map((c) => chainRow(c, runId)).join("");
  cpBody.classList.toggle("closed", !open);
  cpBody.rows[0].onclick = () => {
    openCheckpoints[table.id] = !open;
    chainRows(table, rows, runId);
  };
}

function renderRuns(snap) {
  const current = snap.run ? snap.run.run_id : null;
  $("#runs-empty").style.display = snap.runs.length ? "none" : "";
  $("#runs tbody").innerHTML = snap.runs.map((r) =>
    `<tr data-run="${esc(r.run_id)}" data-status="${esc(r.status)}" data-episodes="${r.episodes}" data-verdict="${r.verdict.status}"` +
    `${r.run_id === current ? ' class="selected"' : ""}>` +
    `<td class="run" title="${esc(r.env_id)}">${esc(r.run_id)}</td>` +
    `<td><span class="pill ${STATUS_CLASS[r.status] || ""}">${esc(r.status)}</span></td>` +
    `<td class="num">${r.episodes}</td>` +
    `<td><span class="pill ${VERDICT_CLASS[r.verdict.status]}">${esc(verdictText(r.verdict))}</span></td></tr>`).join("");
  for (const tr of document.querySelectorAll("#runs tbody tr")) {
    tr.onclick = () => select(tr.dataset.run);
  }
}

function renderRun(run) {
  const set = (id, text, value) => { const el = $(id); el.textContent = text; el.dataset.value = value ?? ""; };
  if (!run) {
    set("#run-id", "no run yet");
    return;
  }
  set("#run-id", run.run_id, run.run_id);
  set("#run-env", `${run.env_id || "?"} ${run.env_version || ""}`, run.env_id);
  pill($("#run-status"), run.status + (run.batches > 1 ? ` (batch ${run.batches})` : ""), STATUS_CLASS[run.status]);
  $("#run-status").dataset.value = run.status;
  set("#run-episodes", run.episodes_planned ? `${run.episodes} / ${run.episodes_planned}` : `${run.episodes}`, run.episodes);
  set("#run-steps", `${run.steps}`, run.steps);
  set("#run-last-return", fmt(run.last_return), run.last_return);
  pill($("#run-verdict"), verdictText(run.verdict), VERDICT_CLASS[run.verdict.status]);
  $("#run-verdict").dataset.value = run.verdict.status;

  const agents = run.agents.length ? run.agents : (run.credits ? run.credits.agents : []);
  lineChart($('svg[data-chart="returns"]'), {
    series: [{ name: "team", colour: TEAM_COLOUR, points: run.returns }],
    xLabel: "episode (in order written)", yLabel: "team return (reward)", empty: "no episode summary yet" });
  lineChart($('svg[data-chart="updates"]'), {
    series: run.updates.map((u, i) => ({ name: u.algorithm || u.chain_id, colour: i ? AGENT_COLOURS[(i + 3) % 8] : TEAM_COLOUR,
      points: u.points.map((p) => [p.x, p.y]) })),
    xLabel: "policy update", yLabel: "mean team return (reward)", empty: "no policy.update for this run" });
  const cr = run.credits;
  lineChart($('svg[data-chart="credits"]'), {
    series: cr ? cr.agents.map((a) => ({ name: a, colour: agentColour(agents, a), points: cr.series[a] })) : [],
    xLabel: "episode (of the credit chain)", yLabel: "credit (reward)", legend: true,
    empty: "no di.credit yet (is a processor running? ./dev process)" });
  const fa = run.fairness;
  const fx = fa && fa.window === "sliding" ? "credits counted (sliding window)" : "episode (of the fairness chain)";
  lineChart($('svg[data-chart="gini"]'), {
    series: [{ name: "gini", colour: TEAM_COLOUR, points: fa ? fa.gini : [] }],
    xLabel: fx, yLabel: "Gini (0–1)", yMin: 0, yMax: 1, empty: "no fairness.metrics yet" });
  lineChart($('svg[data-chart="jain"]'), {
    series: [{ name: "jain", colour: TEAM_COLOUR, points: fa ? fa.jain : [] }],
    xLabel: fx, yLabel: "Jain (1/n–1)", yMin: 0, yMax: 1, empty: "no fairness.metrics yet" });
  lineChart($('svg[data-chart="diversity"]'), {
    series: fa ? fa.agents.map((a) => ({ name: a, colour: agentColour(agents, a), points: fa.diversity[a] })) : [],
    xLabel: fx, yLabel: "diversity factor", yMin: -0.25, yMax: 0.2, legend: true, empty: "no fairness.metrics yet" });
  tierBars($("#tiers"), run.tiers, agents);

  const v = run.verdict;
  const av = $("#audit-verdict");
  av.dataset.status = v.status;
  av.innerHTML = `<span class="pill ${VERDICT_CLASS[v.status]}">${esc(verdictText(v))}</span> ` +
    `${v.chains} chains, ${v.events} events read` +
    (v.pending_events > 0 ? `; ${v.pending_events} event(s) arrived after the last verification` : "") +
    (v.first_break ? `<br>first break: ${esc(v.first_break)}` : "");
  chainRows($("#chains"), run.chains, run.run_id);
}

function renderAudit(snap) {
  chainRows($("#other-chains"), snap.other_chains, null);
  const ov = snap.other_verdict;
  $("#other-verdict").innerHTML = `<span class="pill ${ov.chains ? VERDICT_CLASS[ov.status] : ""}">${esc(verdictText(ov))}</span> ${ov.chains} chains`;
  const dl = snap.dead_letters;
  $("#dlq-total").textContent = `${dl.total} on marl.dlq` + (dl.total > dl.recent.length ? `, the last ${dl.recent.length} shown` : "");
  $("#dlq tbody").innerHTML = dl.recent.length ? dl.recent.map((d) =>
    `<tr class="dlq-row" data-source-topic="${esc(d.source_topic)}" data-source-offset="${d.source_offset}" ` +
    `data-kind="${esc(d.error_kind)}" data-reason="${esc(d.reason)}">` +
    `<td>${when(d.at)}</td><td>${esc(d.source_topic)} p${d.source_partition} @${d.source_offset}</td>` +
    `<td class="chain">${esc(d.source_key)}</td><td>${esc(d.error_kind)}</td><td class="reason">${esc(d.reason)}</td>` +
    `<td>${esc(d.consumer)}</td></tr>`).join("") : `<tr><td colspan="6" class="hint">none</td></tr>`;
  const ver = snap.verification;
  const notes = ver ? ver.notes : [];
  $("#notes-count").textContent = ver ? `(${notes.length + ver.more_notes})` : "";
  $("#notes ul").innerHTML = notes.map((n) => `<li>${esc(n)}</li>`).join("") +
    (ver && ver.more_notes ? `<li>… and ${ver.more_notes} more</li>` : "");
}

function renderMeta(snap) {
  const m = snap.meta;
  $("#source").textContent = `${m.bootstrap}${m.prefix ? " · prefix " + m.prefix : ""}`;
  $("#progress").textContent = `${snap.records} events read` + (m.behind ? ` · catching up, ${m.behind} behind` : "");
  $("#progress").dataset.records = snap.records;
  const ver = snap.verification;
  $("#verifystate").textContent = m.verifying ? "verifying…" :
    ver ? `verified at ${new Date(ver.at * 1000).toLocaleTimeString()} (${ver.seconds.toFixed(2)} s)` : "not verified yet";
  if (!m.public_key) $("#verifystate").textContent += " · no public key: signatures not checked";
  const errors = [m.tail_error, m.verify_error].filter(Boolean);
  $("#errors").innerHTML = errors.map((e) => `<div>${esc(e)}</div>`).join("");
}

function render(snap) {
  renderMeta(snap);
  renderRuns(snap);
  renderRun(snap.run);
  renderAudit(snap);
  document.body.dataset.version = snap.version;
}

function setConn(state) {
  const el = $("#conn");
  el.dataset.state = state;
  pill(el, state, state === "live" ? "ok" : state === "connecting" ? "pending" : "bad");
}

function connect() {
  if (source) source.close();
  source = new EventSource("/events" + (selected ? "?run=" + encodeURIComponent(selected) : ""));
  setConn("connecting");
  source.onopen = () => setConn("live");
  source.onmessage = (e) => { setConn("live"); render(JSON.parse(e.data)); };
  source.onerror = () => setConn("reconnecting");   // EventSource reconnects by itself
}

function select(runId) {
  selected = runId;
  history.replaceState(null, "", "#run=" + encodeURIComponent(runId));
  connect();
}

connect();
