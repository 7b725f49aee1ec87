"use strict";
// Shared by the edge-proxy dashboard and the node-agent page: the token, JSON polling,
// small DOM and SVG builders, number formats. No libraries: the pages work offline.

const Llamanap = (() => {
  const TOKEN_KEY = "llamanap-token";
  const SVG_NS = "http://www.w3.org/2000/svg";

  // The token arrives once in the fragment (/#token=...), which browsers never send to the
  // server; it is kept in localStorage and the fragment is cleared from the address bar.
  function takeTokenFromFragment() {
    const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
    if (m) {
      localStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  class AuthNeeded extends Error {}

  async function getJSON(path) {
    const headers = {};
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) headers.authorization = "Bearer " + token;
    const r = await fetch(path, { headers, cache: "no-store" });
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    const message = body && body.error ? body.error.message : r.statusText;
    if (r.status === 401) throw new AuthNeeded(message);
    if (!r.ok) throw new Error(`${path}: ${r.status} ${message}`);
    return body;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    node.append(...children.flat().filter((c) => c !== null && c !== undefined));
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    node.append(...children.flat().filter((c) => c !== null && c !== undefined));
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) node.setAttribute(k, String(v));
    }
  }

  function title(text) { return svg("title", {}, text); }

  function replace(id, ...children) {
    document.getElementById(id).replaceChildren(
      ...children.flat().filter((c) => c !== null && c !== undefined));
  }

  function empty(text) { return el("p", { class: "empty" }, text); }

  // The login form replaces the page's body text until a token that works is entered.
  function showLogin(message, onToken) {
    const input = el("input", { type: "password", id: "token-input", autocomplete: "off",
                                placeholder: "bearer token" });
    const form = el("form", { id: "login-form" },
      el("p", {}, `The control API needs its token (${message}). It is kept in this ` +
                  "browser's local storage and sent only to this server."),
      input, el("button", { type: "submit" }, "Use token"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      localStorage.setItem(TOKEN_KEY, input.value.trim());
      document.getElementById("login").hidden = true;
      onToken();
    });
    const box = document.getElementById("login");
    box.replaceChildren(form);
    box.hidden = false;
  }

  // Runs ``refresh`` now and every ``intervalMs``; errors show in #problem, a 401 the form.
  // Returns a function that refreshes at once (for controls that change what is shown).
  function poll(refresh, intervalMs) {
    let timer = null;
    async function tick() {
      clearTimeout(timer);
      try {
        await refresh();
        document.getElementById("problem").hidden = true;
        document.getElementById("updated").textContent =
          "updated " + new Date().toLocaleTimeString();
      } catch (err) {
        if (err instanceof AuthNeeded) {
          showLogin(err.message, tick);
          return;  // no retries with a token that does not work
        }
        const box = document.getElementById("problem");
        box.textContent = "Cannot refresh: " + err.message;
        box.hidden = false;
      }
      timer = setTimeout(tick, intervalMs);
    }
    takeTokenFromFragment();
    tick();
    return tick;
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "–";
    return ms < 10000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
  }

  function fmtS(s) {
    if (s === null || s === undefined) return "–";
    if (s < 120) return `${Math.round(s)} s`;
    if (s < 7200) return `${Math.round(s / 60)} min`;
    return `${(s / 3600).toFixed(1)} h`;
  }

  function fmtNum(v, digits = 0, unit = "") {
    return v === null || v === undefined ? "–" : `${v.toFixed(digits)}${unit}`;
  }

  function fmtClock(unixS) {
    return new Date(unixS * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function table(head, rows, attrs) {
    return el("table", attrs || {},
      el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows));
  }

  return { el, svg, title, replace, empty, getJSON, poll, fmtMs, fmtS, fmtNum, fmtClock,
           table };
})();
