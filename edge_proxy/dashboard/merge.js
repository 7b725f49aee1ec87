"use strict";
// What the dashboard holds between polls: the last whole answer, plus the rows each
// incremental answer (?cursor=...) added, less what left the window. The result has the
// shape of a whole answer, so the charts draw it the same way.

const DashboardMerge = (() => {
  function clip(spans, since) {
    return spans.filter((p) => p.end > since)
      .map((p) => ({ ...p, start: Math.max(p.start, since) }));
  }

  function byTime(a, b) { return a.t - b.t; }

  function node(old, fresh, since) {
    const wakes = new Map(old.wakes.filter((w) => w.started >= since).map((w) => [w.started, w]));
    for (const w of fresh.wakes) wakes.set(w.started, w);  // a wake sent again is newer
    const gpus = new Map(old.gpus.map((g) => [g.uuid, {
      uuid: g.uuid, points: g.points.filter((p) => p.t >= since), busy: clip(g.busy, since) }]));
    for (const g of fresh.gpus) {
      const had = gpus.get(g.uuid) || { uuid: g.uuid, points: [], busy: [] };
      gpus.set(g.uuid, { uuid: g.uuid, points: had.points.concat(g.points).sort(byTime),
                         busy: had.busy.concat(g.busy) });
    }
    return { ...fresh,
      power: clip(old.power.filter((p) => !p.live), since).concat(fresh.power),
      wakes: [...wakes.values()].sort((a, b) => b.started - a.started),
      gpus: [...gpus.values()].sort((a, b) => (a.uuid < b.uuid ? -1 : 1)),
      connections: fresh.connections.concat(old.connections.filter((c) => c.t >= since)),
      energy_week: fresh.energy_week || old.energy_week };
  }

  // The summary to draw: ``fresh`` itself when it is a whole answer.
  function merge(old, fresh) {
    if (!old || !fresh.incremental) return fresh;
    const before = new Map(old.nodes.map((n) => [n.name, n]));
    const nodes = fresh.nodes.map((n) => (before.has(n.name)
      ? node(before.get(n.name), n, fresh.since) : n));
    return { ...fresh, nodes };
  }

  // Requests, newest first: the new ones and those still in the window.
  function requests(old, fresh, since) {
    return fresh.concat(old.filter((r) => r.t >= since)).sort((a, b) => b.t - a.t);
  }

  return { merge, requests };
})();
