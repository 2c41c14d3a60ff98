// The cluster page: polls the data URL every 2 s and draws what it gets. Every value from
// the cluster is inserted as text (never as markup): actor types come from hosts.
"use strict";

const PERIOD_MS = 2000;
const dataUrl = new URL("data", location.href.endsWith("/") ? location.href : location.href + "/");

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function fmt(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return `${fmt(seconds, 1)} s`;
  if (seconds < 5400) return `${fmt(seconds / 60, 1)} min`;
  return `${fmt(seconds / 3600, 1)} h`;
}

function rows(tableId, cells) {
  const body = document.querySelector(`#${tableId} tbody`);
  const fresh = document.createElement("tbody");
  for (const row of cells) {
    const tr = document.createElement("tr");
    for (const value of row) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.appendChild(td);
    }
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
}

function chart(id, times, values, unit) {
  const canvas = document.getElementById(id);
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 44, bottom = 18;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7480";
  const points = [];
  for (let i = 0; i < times.length; i++) {
    if (values[i] !== null && values[i] !== undefined) points.push([times[i], values[i]]);
  }
  if (points.length === 0) {
    ctx.fillText("no data yet", left, h / 2);
    return;
  }
  const t0 = points[0][0], t1 = Math.max(points[points.length - 1][0], t0 + 1);
  const top = Math.max(...points.map((p) => p[1])) * 1.15 || 1;
  ctx.strokeStyle = "#d8dde3";
  ctx.beginPath();
  ctx.moveTo(left, 4); ctx.lineTo(left, h - bottom); ctx.lineTo(w - 4, h - bottom);
  ctx.stroke();
  ctx.fillText(fmt(top, top < 10 ? 1 : 0) + (unit || ""), 2, 12);
  ctx.fillText("0", 30, h - bottom);
  ctx.fillText(`${ago(t1 - t0)} shown`, left + 4, h - 4);
  ctx.strokeStyle = "#2b6cb0";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  points.forEach(([t, v], i) => {
    const x = left + ((t - t0) / (t1 - t0)) * (w - left - 6);
    const y = h - bottom - (v / top) * (h - bottom - 6);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function last(values) {
  for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null) return values[i];
  return null;
}

function show(data) {
  const s = data.series;
  text("hosts-count", fmt(data.hosts.length));
  text("activations-count", fmt(data.hosts.reduce((n, host) => n + host.activations, 0)));
  text("calls-rate", fmt(last(s.calls_per_second), 1));
  text("placements-rate", fmt(last(s.placements_per_second), 1));
  text("sessions-count", data.gateway_sessions === null ? "–" : fmt(data.gateway_sessions));
  rows("hosts", data.hosts.map((host) => [
    String(host.server_id), host.address, fmt(host.activations), fmt(host.load, 2),
    fmt(host.calls_per_second, 1), ago(host.age_seconds), `${host.lease_ttl} s`,
    `${ago(host.renewed_seconds_ago)} ago`,
  ]));
  rows("types", Object.entries(data.activations_by_type)
    .sort((a, b) => b[1] - a[1])
    .map(([type, n]) => [type, fmt(n)]));
  chart("chart-calls", s.time, s.calls_per_second, "");
  chart("chart-latency", s.time, s.mean_call_ms, " ms");
  chart("chart-placements", s.time, s.placements_per_second, "");
  chart("chart-sessions", s.time, s.gateway_sessions, "");
  text("updated", `as of ${new Date(data.time * 1000).toLocaleTimeString()}`);
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch(dataUrl, { cache: "no-store", credentials: "same-origin" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    show(await resp.json());
    status.textContent = "live";
    status.className = "status ok";
  } catch (err) {
    status.textContent = `unreachable (${err.message})`;
    status.className = "status bad";
  }
  setTimeout(poll, PERIOD_MS);
}

poll();
