"use strict";
// The edge-proxy dashboard: polls /v1/dashboard/summary and /v1/history/requests and draws
// every chart as SVG. Each drawn point carries data-kind (and data-node, data-gpu,
// data-model) so a person inspecting the page, and the tests, can count what was drawn.
// After the first answer each poll sends back the answer's cursor and gets only the rows
// written since, which the page adds to what it holds (merge.js).

(() => {
  const { el, svg, title, replace, empty, getJSON, poll, fmtMs, fmtS, fmtNum, fmtClock,
          table } = Llamanap;
  const POLL_MS = 3000;
  const FULL_REFRESH_MS = 5 * 60 * 1000;  // start over now and then: bounds what the page holds
  const ENERGY_POLL_MS = 60 * 1000;       // the week's energy reads the whole week: once a minute
  const CONNECTION_ROWS = 25;             // the newest TCP connections listed
  const W = 900;            // chart width in SVG units (scaled to the card)
  const LEFT = 120;         // room for row labels
  const ROW_H = 18;
  const CHART_H = 150;
  const SMALL_W = 420;      // the GPU charts, three to a row
  const SMALL_LEFT = 60;
  const SCATTER_W = 600;    // the request charts, two to a row
  const GPU_BUSY_PCT = 5;   // a GPU sample at or above this utilization draws as busy
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
                   "#be185d", "#4d7c0f"];
  const STEPS = [["packet", "packet"], ["host_up", "host up"], ["port_open", "port open"],
                 ["ready", "READY"], ["first_byte", "first byte"]];

  const windowSelect = document.getElementById("window");
  const fromUrl = new URLSearchParams(location.search).get("window_s");
  if (fromUrl) {
    if (![...windowSelect.options].some((o) => o.value === fromUrl)) {
      windowSelect.append(el("option", { value: fromUrl }, fmtS(Number(fromUrl))));
    }
    windowSelect.value = fromUrl;
  }

  function x(t, since, now, width = W) {
    const left = width >= W ? LEFT : SMALL_LEFT;
    return left + ((t - since) / Math.max(1, now - since)) * (width - left - 10);
  }

  function timeAxis(since, now, y, width = W) {
    const ticks = [];
    for (let i = 0; i <= 4; i++) {
      const t = since + ((now - since) * i) / 4;
      const anchor = i === 0 ? "start" : i === 4 ? "end" : "middle";
      ticks.push(svg("text", { x: x(t, since, now, width), y, "text-anchor": anchor },
                     fmtClock(t)));
    }
    return ticks;
  }

  function modelColors(models) {
    const colors = {};
    [...models].sort().forEach((m, i) => { colors[m] = PALETTE[i % PALETTE.length]; });
    return colors;
  }

  // -- nodes now and energy -------------------------------------------------------------

  function drawNodes(data) {
    if (!data.nodes.length) {
      replace("nodes", empty("no nodes configured and none in the history"));
      return;
    }
    const rows = data.nodes.map((n) => el("tr", { "data-kind": "node", "data-node": n.name },
      el("td", {}, el("b", {}, n.name)),
      el("td", {}, n.state ? el("span", { class: "pill " + n.state.toLowerCase() }, n.state)
                           : el("span", { class: "muted" }, "not configured")),
      el("td", {}, n.time_in_state_s === null ? "–" : fmtS(n.time_in_state_s)),
      el("td", {}, n.reason || ""),
      el("td", {}, `${n.active} / ${n.held}`),
      el("td", {}, n.models.length
        ? el("ul", { class: "models" }, n.models.map((m) =>
            el("li", { "data-kind": "model", "data-node": n.name }, m)))
        : el("span", { class: "muted" }, "no models named by its routes"))));
    replace("nodes", table(["node", "state", "for", "why", "relaying / held", "serves"],
                           rows));
  }

  function money(value, currency) {
    return `${value.toFixed(2)} ${currency || ""}`.trim();
  }

  function drawEnergy(data) {
    const weeks = data.nodes.filter((n) => n.energy_week);
    const priced = weeks.some((n) => n.energy_week.saved_money !== null &&
                                     n.energy_week.saved_money !== undefined);
    const rows = weeks.map((n) => {
      const e = n.energy_week;
      const cost = priced ? [
        el("td", { class: "big", "data-kind": "saved-money", "data-node": n.name },
           money(e.saved_money, e.currency)),
        el("td", { "data-kind": "used-money", "data-node": n.name },
           money(e.used_money, e.currency))] : [];
      return el("tr", {},
        el("td", {}, n.name), el("td", {}, e.period),
        el("td", { class: "big", "data-kind": "saved-kwh", "data-node": n.name },
           `${e.saved_kwh.toFixed(3)} kWh`),
        el("td", {}, `${e.used_kwh.toFixed(3)} kWh`), cost,
        el("td", {}, fmtS(e.asleep_s)), el("td", {}, fmtS(e.awake_s)),
        el("td", {}, fmtS(e.busy_s)));
    });
    const head = ["node", "week", "saved by sleeping", "used",
                  ...(priced ? ["saved", "cost"] : []), "asleep", "awake idle", "busy"];
    replace("energy", rows.length ? table(head, rows)
      : empty(historyNote(data, "no power states recorded this week yet")));
  }

  function historyNote(data, fallback) {
    if (!data.history.enabled) {
      return "history is off: set [history] enabled = true in the proxy's config";
    }
    return data.history.problem ? "history cannot be read: " + data.history.problem : fallback;
  }

  // -- power timeline -------------------------------------------------------------------

  function drawPower(data) {
    const { since, now } = data;
    const rows = [];
    let y = 0;
    for (const n of data.nodes) {
      rows.push(svg("text", { x: 0, y: y + 13 }, n.name));
      for (const p of n.power) {
        rows.push(svg("rect", { x: x(p.start, since, now), y, height: ROW_H - 4,
          width: Math.max(1, x(p.end, since, now) - x(p.start, since, now)),
          class: p.state, "data-kind": "power", "data-node": n.name, "data-state": p.state },
          title(`${n.name}: ${p.state} ${fmtClock(p.start)}–${fmtClock(p.end)}` +
                ` (${fmtS(p.end - p.start)})`)));
      }
      y += ROW_H;
      for (const g of n.gpus) {
        rows.push(svg("text", { x: 12, y: y + 13 }, g.uuid.slice(0, 12) + "…"));
        g.points.forEach((p, i) => {
          const next = i + 1 < g.points.length ? g.points[i + 1].t : Math.min(now, p.t + 1);
          const busy = (p.utilization_pct || 0) >= GPU_BUSY_PCT;
          rows.push(svg("rect", { x: x(p.t, since, now), y: y + 3, height: ROW_H - 10,
            width: Math.max(1, x(next, since, now) - x(p.t, since, now)),
            class: busy ? "busy" : "awake", "data-kind": "gpu-activity", "data-node": n.name,
            "data-gpu": g.uuid }, title(`${fmtNum(p.utilization_pct, 0, " %")} busy`)));
        });
        for (const b of g.busy) {  // the agent's spans: an instance on this GPU had a task
          rows.push(svg("rect", { x: x(b.start, since, now), y: y + 1, height: 3,
            width: Math.max(1, x(b.end, since, now) - x(b.start, since, now)), class: "busy",
            "data-kind": "gpu-busy", "data-node": n.name, "data-gpu": g.uuid },
            title(`${g.uuid}: a task ${fmtClock(b.start)}–${fmtClock(b.end)}` +
                  ` (${fmtS(b.end - b.start)})`)));
        }
        y += ROW_H;
      }
    }
    if (!data.nodes.length) {
      replace("power", empty("no nodes to show"));
      return;
    }
    replace("power", svg("svg", { viewBox: `0 0 ${W} ${y + 18}` }, rows,
                         timeAxis(since, now, y + 14)));
  }

  // -- wakes ----------------------------------------------------------------------------

  function drawWakes(data) {
    const wakes = data.nodes.flatMap((n) => n.wakes.map((w) => ({ node: n.name, ...w })));
    if (!wakes.length) {
      replace("wakes", empty(historyNote(data, "no wakes recorded yet")));
      return;
    }
    const longest = Math.max(1, ...wakes.map((w) => Math.max(w.total_ms || 0,
      ...Object.values(w.steps).filter((v) => v !== null))));
    const sx = (ms) => LEFT + (ms / longest) * (W - LEFT - 290);  // room for the label
    const parts = [];
    wakes.slice(0, 12).forEach((w, i) => {
      const y = i * 26 + 10;
      const reached = STEPS.filter(([k]) => w.steps[k] !== null && w.steps[k] !== undefined);
      const last = reached.length ? w.steps[reached[reached.length - 1][0]] : 0;
      const marks = reached.map(([k, label]) => svg("circle", {
        cx: sx(w.steps[k]), cy: y + 6, r: 5, class: "step " + k, "data-kind": "wake-step",
        "data-step": k, fill: k === "first_byte" ? "#16a34a" : "#2563eb" },
        title(`${label}: ${fmtMs(w.steps[k])} after the first packet`)));
      parts.push(svg("g", { "data-kind": "wake", "data-node": w.node },
        svg("text", { x: 0, y: y + 10 }, `${w.node} ${fmtClock(w.started)}`),
        svg("line", { x1: sx(0), x2: sx(last), y1: y + 6, y2: y + 6, stroke: "#94a3b8",
                      "stroke-width": 3 }),
        marks,
        svg("text", { x: sx(last) + 8, y: y + 10 },
            [w.outcome === "ready" ? null : w.outcome,
             w.steps.ready === null ? "never READY" : `READY ${fmtMs(w.steps.ready)}`,
             w.steps.first_byte === null ? null : `first byte ${fmtMs(w.steps.first_byte)}`,
             `${w.packets} packet(s)`].filter((p) => p).join(" · "))));
    });
    const legend = el("p", { class: "muted" },
      "Steps in ms after the first magic packet: " + STEPS.map(([, l]) => l).join(" → ") +
      ". Hover a dot for its time.");
    replace("wakes", legend,
            svg("svg", { viewBox: `0 0 ${W} ${Math.min(12, wakes.length) * 26 + 14}` }, parts));
  }

  // -- requests -------------------------------------------------------------------------

  function scatter(rows, field, kind, unit, since, now, colors) {
    const points = rows.filter((r) => r[field] !== null && r[field] !== undefined);
    if (!points.length) return empty(`no requests with ${unit} in this window`);
    const top = Math.max(1, ...points.map((r) => r[field])) * 1.1;
    const y = (v) => 10 + (1 - v / top) * (CHART_H - 30);
    return svg("svg", { viewBox: `0 0 ${SCATTER_W} ${CHART_H}` },
      svg("line", { class: "axis", x1: SMALL_LEFT, x2: SCATTER_W - 10, y1: y(0), y2: y(0) }),
      svg("text", { x: 0, y: 14 }, `${fmtNum(top, 0)} ${unit}`),
      svg("text", { x: 0, y: y(0) }, `0 ${unit}`),
      points.map((r) => svg("circle", { cx: x(r.t, since, now, SCATTER_W), cy: y(r[field]), r: 4,
        fill: colors[r.model || "(no model)"], "data-kind": kind,
        "data-model": r.model || "(no model)" },
        title(`${r.model || "(no model)"}: ${r[field].toFixed(1)} ${unit}`))),
      timeAxis(since, now, CHART_H - 4, SCATTER_W));
  }

  function drawRequests(data, answer) {
    const rows = answer.requests;
    if (!rows.length) {
      replace("requests", empty(historyNote(data, "no requests recorded in this window")));
      return;
    }
    const counts = {};
    for (const r of rows) counts[r.model || "(no model)"] = (counts[r.model || "(no model)"] || 0) + 1;
    const colors = modelColors(Object.keys(counts));
    const legend = el("div", { class: "legend" }, Object.entries(counts).map(([m, c]) => {
      const swatch = el("i");
      swatch.style.background = colors[m];
      return el("span", { "data-kind": "model-count", "data-model": m }, swatch, `${m}: ${c}`);
    }));
    const recent = rows.slice(0, 10).map((r) => el("tr", { "data-kind": "request" },
      el("td", {}, new Date(r.t * 1000).toLocaleTimeString()), el("td", {}, r.node),
      el("td", {}, r.model || "–"), el("td", {}, `${r.method} ${r.path}`),
      el("td", {}, r.status === null ? "–" : String(r.status)), el("td", {}, r.outcome),
      el("td", {}, r.held_ms ? fmtMs(r.held_ms) : "–"), el("td", {}, fmtMs(r.ttfb_ms)),
      el("td", {}, fmtNum(r.predicted_per_s, 1))));
    replace("requests", legend,
      el("div", { class: "grid2" },
        el("div", {}, el("h3", {}, "time to first token (ms)"),
           scatter(rows, "ttfb_ms", "ttft", "ms", data.since, data.now, colors)),
        el("div", {}, el("h3", {}, "generated tokens per second"),
           scatter(rows, "predicted_per_s", "tps", "tok/s", data.since, data.now, colors))),
      el("h3", {}, "latest requests"),
      table(["time", "node", "model", "request", "status", "outcome", "held", "first byte",
             "tok/s"], recent));
  }

  // -- GPUs -----------------------------------------------------------------------------

  function line(points, field, label, unit, gpu, node, since, now) {
    const values = points.filter((p) => p[field] !== null && p[field] !== undefined);
    if (!values.length) return el("div", {}, el("h3", {}, label), empty("no samples"));
    const lo = Math.min(...values.map((p) => p[field]));
    const hi = Math.max(...values.map((p) => p[field]));
    const span = Math.max(1, hi - lo);
    const y = (v) => 10 + (1 - (v - lo) / span) * (CHART_H - 40);
    const path = values.map((p) => `${x(p.t, since, now, SMALL_W).toFixed(1)},` +
                                   `${y(p[field]).toFixed(1)}`);
    const last = fmtNum(values[values.length - 1][field], 0);
    return el("div", {}, el("h3", {}, `${label}: ${last} ${unit}`),
      svg("svg", { viewBox: `0 0 ${SMALL_W} ${CHART_H}` },
        svg("text", { x: 0, y: 14 }, `${fmtNum(hi, 0)} ${unit}`),
        svg("text", { x: 0, y: y(lo) }, `${fmtNum(lo, 0)} ${unit}`),
        svg("polyline", { points: path.join(" "), fill: "none", stroke: "#2563eb",
          "stroke-width": 2, "data-kind": "gpu-" + field, "data-gpu": gpu, "data-node": node,
          "data-points": values.length }),
        timeAxis(since, now, CHART_H - 4, SMALL_W)));
  }

  function drawGpus(data) {
    const cards = [];
    for (const n of data.nodes) {
      for (const g of n.gpus) {
        cards.push(el("h3", {}, `${n.name} · GPU ${g.uuid}`),
          el("div", { class: "grid3" },
            line(g.points, "temperature_c", "temperature", "°C", g.uuid, n.name, data.since, data.now),
            line(g.points, "power_w", "power", "W", g.uuid, n.name, data.since, data.now),
            line(g.points, "memory_used_mib", "memory used", "MiB", g.uuid, n.name, data.since, data.now)));
      }
    }
    replace("gpus", cards.length ? cards
      : [empty(historyNote(data, "no GPU samples recorded in this window"))]);
  }

  // -- TCP connections ------------------------------------------------------------------

  function fmtBytes(n) {
    if (n < 1024) return `${n} B`;
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let v = n / 1024, i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return `${v.toFixed(1)} ${units[i]}`;
  }

  function drawConnections(data) {
    // Only history keeps connections: without it the card goes (the others say why).
    document.getElementById("connections").parentElement.hidden = !data.history.enabled;
    if (!data.history.enabled) {
      replace("connections");
      return;
    }
    const nodes = data.nodes.filter((n) => n.connections.length);
    if (!nodes.length) {
      replace("connections",
              empty(historyNote(data, "no TCP connections recorded in this window")));
      return;
    }
    const parts = [];
    for (const n of nodes) {
      const c = n.connections;
      const up = c.reduce((a, r) => a + r.bytes_up, 0);
      const down = c.reduce((a, r) => a + r.bytes_down, 0);
      parts.push(el("p", { "data-kind": "connection-count", "data-node": n.name },
        `${n.name}: ${c.length} connection(s), ${fmtBytes(up)} up, ${fmtBytes(down)} down, ` +
        `${c.filter((r) => r.woke).length} woke the node`));
      parts.push(table(["opened", "route", "up", "down", "duration", "held", "woke"],
        c.slice(0, CONNECTION_ROWS).map((r) => el("tr", { "data-kind": "connection",
                                                          "data-node": n.name },
          el("td", {}, new Date(r.t * 1000).toLocaleTimeString()), el("td", {}, r.route),
          el("td", {}, fmtBytes(r.bytes_up)), el("td", {}, fmtBytes(r.bytes_down)),
          el("td", {}, fmtMs(r.duration_ms)), el("td", {}, r.held_ms ? fmtMs(r.held_ms) : "–"),
          el("td", {}, r.woke ? "yes" : "–")))));
    }
    replace("connections", parts);
  }

  let view = null;          // the summary the charts draw
  let requests = [];        // newest first
  let cursors = null;       // where the last answers ended; null: ask for everything
  let fullAt = 0;
  let energyAt = 0;
  let polls = 0;
  let incrementalPolls = 0;

  async function refresh() {
    const windowS = Number(windowSelect.value);
    const started = Date.now();
    if (started - fullAt >= FULL_REFRESH_MS) cursors = null;
    let url = `/v1/dashboard/summary?window_s=${windowS}`;
    if (cursors) {
      url += `&cursor=${encodeURIComponent(cursors.summary)}`;
      if (started - energyAt >= ENERGY_POLL_MS) url += "&energy=1";
    }
    const data = await getJSON(url);
    const answer = await getJSON(cursors
      ? `/v1/history/requests?since=${data.since}&cursor=${cursors.requests}`
      : `/v1/history/requests?since=${data.since}&until=${data.now}`);
    view = DashboardMerge.merge(view, data);
    if (data.energy_included) energyAt = started;
    if (answer.incremental) {
      requests = DashboardMerge.requests(requests, answer.requests, data.since);
      incrementalPolls++;
    } else {
      requests = answer.requests;
      fullAt = started;
    }
    const readable = data.history.enabled && !data.history.problem;
    cursors = readable ? { summary: data.cursor, requests: answer.cursor } : null;
    drawNodes(view);
    drawPower(view);
    drawWakes(view);
    drawRequests(view, { requests });
    drawGpus(view);
    drawConnections(view);
    drawEnergy(view);
    polls++;
    document.body.dataset.polls = String(polls);
    document.body.dataset.incrementalPolls = String(incrementalPolls);
    document.body.dataset.loaded = "true";
  }

  const refreshNow = poll(refresh, POLL_MS);
  windowSelect.addEventListener("change", () => { cursors = null; refreshNow(); });
})();
