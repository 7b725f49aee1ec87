"use strict";
// The node-agent's page: polls /v1/status, /v1/gpus and /v1/power and shows them as tables.
// Rows carry data-kind (instance, gpu, keeping-awake) so a person and the tests can count them.

(() => {
  const { el, replace, empty, getJSON, poll, fmtS, fmtNum, table } = Llamanap;
  const POLL_MS = 3000;

  function pill(text) {
    return el("span", { class: "pill " + String(text).toLowerCase() }, String(text));
  }

  function drawPower(power) {
    const reasons = power.keeping_awake.length
      ? el("ul", {}, power.keeping_awake.map((r) => el("li", { "data-kind": "keeping-awake" }, r)))
      : empty("nothing keeps it awake: it sleeps when the idle timer runs out");
    const inhibits = power.inhibits.length
      ? table(["inhibit", "reason", "left"], power.inhibits.map((i) =>
          el("tr", { "data-kind": "inhibit" }, el("td", {}, i.id), el("td", {}, i.reason),
             el("td", {}, fmtS(i.remaining_s)))))
      : null;
    const past = power.history.length
      ? table(["suspend/resume", "steps (s after start)"], power.history.map((h) =>
          el("tr", {}, el("td", {}, h.outcome),
             el("td", {}, h.steps.map(([s, t]) => `${s} ${t}`).join(" → ")))))
      : empty("no suspend or resume since the agent started");
    replace("power",
      el("p", {}, pill(power.state), " for ", fmtS(power.in_state_s), " · ",
         power.enabled ? (power.sleep_in_s === null ? "no sleep planned"
                                                    : `sleeps in ${fmtS(power.sleep_in_s)}`)
                       : "suspend is off ([power] enabled = false)",
         power.last_error ? el("span", { class: "muted" }, ` · last error: ${power.last_error}`)
                          : null),
      el("p", { class: "muted" }, power.verdict || ""),
      el("h3", {}, "keeping it awake"), reasons, inhibits, el("h3", {}, "recent"), past);
  }

  function drawInstances(status) {
    const rows = status.instances.map((i) => el("tr", {
        "data-kind": "instance", "data-instance": i.name,
        "data-loaded": i.state === "ready" ? "true" : "false" },
      el("td", {}, el("b", {}, i.name)),
      el("td", {}, i.state === "ready" ? "loaded" : "unloaded"),
      el("td", {}, pill(i.state)),
      el("td", {}, i.enabled ? "yes" : "no"),
      el("td", {}, i.pid === null ? "–" : String(i.pid)),
      el("td", {}, `${i.host}:${i.port}`),
      el("td", {}, (i.gpus || []).join(", ") || "CPU"),
      el("td", {}, fmtS(i.uptime_s)), el("td", {}, String(i.restarts)),
      el("td", {}, i.last_error || i.reason || "")));
    replace("instances", rows.length
      ? table(["instance", "model loaded", "state", "enabled", "pid", "listens", "GPUs", "up", "restarts",
               "why"], rows)
      : empty("no instances configured"));
    document.getElementById("title").textContent = `llamanap · node-agent · ${status.node}`;
  }

  function drawGpus(gpus) {
    if (gpus === null) {
      replace("gpus", empty("this agent offers no GPU status (/v1/gpus)"));
      return;
    }
    const rows = gpus.gpus.map((g) => el("tr", { "data-kind": "gpu", "data-gpu": g.uuid,
                                                 "data-empty": g.empty ? "true" : "false" },
      el("td", {}, `${g.index} ${g.name}`), el("td", { class: "muted" }, g.pci_bus_id),
      el("td", {}, `${fmtNum(g.memory_used_mib, 0)} / ${fmtNum(g.memory_total_mib, 0)} MiB`),
      el("td", {}, `${fmtNum(g.estimated_mib, 0)} / ${fmtNum(g.reported_mib, 0)} MiB`),
      el("td", {}, fmtNum(g.utilization_pct, 0, " %")),
      el("td", {}, fmtNum(g.temperature_c, 0, " °C")), el("td", {}, fmtNum(g.power_w, 0, " W")),
      el("td", {}, g.pstate === null ? "–" : `P${g.pstate}`),
      el("td", {}, `${g.pstate_wanted ?? "–"} / ${g.pstate_read_back ?? "–"}`),
      el("td", {}, g.pstate_control),
      el("td", g.empty ? { class: "muted" } : {},
         g.empty ? "empty" : (g.instances || []).join(", ")),
      el("td", {}, g.pstate_reason || "")));
    const note = [gpus.inventory_problem, gpus.backend_problem].filter((p) => p).join("; ");
    replace("gpus", rows.length
      ? [table(["GPU", "PCI", "memory", "estimated / reported", "busy", "temp", "power",
                "P-state", "wanted / read", "control", "instances", "why"], rows),
         note ? el("p", { class: "muted" }, note) : null].filter((n) => n)
      : empty("no GPUs" + (note ? ": " + note : "")));
  }

  async function optional(path) {
    try { return await getJSON(path); } catch (err) {
      if (/: 404 /.test(err.message)) return null;
      throw err;
    }
  }

  async function refresh() {
    const [status, gpus, power] = await Promise.all(
      [getJSON("/v1/status"), optional("/v1/gpus"), optional("/v1/power")]);
    drawInstances(status);
    drawGpus(gpus);
    if (power === null) replace("power", empty("this agent offers no power status (/v1/power)"));
    else drawPower(power);
    document.body.dataset.loaded = "true";
  }

  poll(refresh, POLL_MS);
})();
