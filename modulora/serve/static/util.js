// Shared helpers: DOM building, the API (with the key), formats, expert colours, sortable
// tables and small SVG charts. Everything user-supplied goes in as text, never as HTML.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.setAttribute("class", v);
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "style" && typeof v === "object") Object.assign(node.style, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
}

function append(node, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
}

// -- the API ----------------------------------------------------------------------------------

const KEY = "modulora-api-key";
export const apiKey = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (k) => (k ? sessionStorage.setItem(KEY, k) : sessionStorage.removeItem(KEY)),
};

export function headers(extra = {}) {
  const h = { ...extra };
  const k = apiKey.get();
  if (k) h.Authorization = `Bearer ${k}`;
  return h;
}

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** The server's error, in words: OpenAI's {"error": {"message"}} or the HTTP status. */
export async function errorOf(resp) {
  let message = `HTTP ${resp.status} ${resp.statusText}`.trim();
  let code = null;
  try {
    const body = await resp.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  if (resp.status === 401) message += " Set the key with the “API key” button at the top.";
  return new ApiError(resp.status, message, code);
}

export async function getJSON(url) {
  let resp;
  try {
    resp = await fetch(url, { headers: headers() });
  } catch (e) {
    throw new ApiError(0, `the server cannot be reached (${e.message})`);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

export async function send(method, url, body) {
  const init = { method, headers: headers() };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let resp;
  try {
    resp = await fetch(url, init);
  } catch (e) {
    throw new ApiError(0, `the server cannot be reached (${e.message})`);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

// The library, shared by the views (the playground's picker, the colours); reloaded on demand.
let adapters = null;
export async function loadAdapters(force = false) {
  if (force || adapters === null) {
    adapters = (await getJSON("/v1/adapters")).data;
    setExperts(adapters.map((a) => a.name));
  }
  return adapters;
}

// -- formats ----------------------------------------------------------------------------------

export function fmtCount(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  const abs = Math.abs(n);
  if (abs >= 1e9) return (n / 1e9).toFixed(abs >= 1e10 ? 0 : 1) + "B";
  if (abs >= 1e6) return (n / 1e6).toFixed(abs >= 1e7 ? 0 : 1) + "M";
  if (abs >= 1e3) return (n / 1e3).toFixed(abs >= 1e4 ? 0 : 1) + "k";
  return String(Math.round(n * 100) / 100);
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(n >= 100 ? 0 : 1) : n} ${units[i]}`;
}

export function fmtDate(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const pad = (x) => String(x).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

export function fmtNum(x, digits = 3) {
  if (x === null || x === undefined || typeof x !== "number" || Number.isNaN(x)) return x === null || x === undefined ? "–" : String(x);
  if (Number.isInteger(x)) return String(x);
  return x.toFixed(digits);
}

// -- expert colours: one fixed colour per adapter name (the library's order), with a legend ----

const PALETTE = ["#3b75af", "#e4812f", "#4f9d45", "#cf3e3e", "#8a63b8", "#2aa5a0", "#c2a322",
  "#d66fae", "#7f6048", "#3f4fb0", "#95b83a", "#6b7b8c"];
const BASE_COLOR = "#9aa0a6";
let expertIndex = new Map();

export function setExperts(names) {
  expertIndex = new Map([...names].sort().map((n, i) => [n, i]));
}

export function expertColor(name) {
  if (!name || name === "base") return BASE_COLOR;
  let i = expertIndex.get(name);
  if (i === undefined) {
    i = 0;
    for (const ch of name) i = (i * 31 + ch.codePointAt(0)) >>> 0;
  }
  return PALETTE[i % PALETTE.length];
}

export function tint(hex, alpha) {
  const v = parseInt(hex.slice(1), 16);
  return `rgba(${(v >> 16) & 255}, ${(v >> 8) & 255}, ${v & 255}, ${alpha.toFixed(3)})`;
}

/** The expert with the largest weight of {name: weight}, or null. */
export function topExpert(weights) {
  let best = null;
  for (const [n, w] of Object.entries(weights || {})) if (best === null || w > weights[best]) best = n;
  return best;
}

export function legend(names) {
  return el("ul", { class: "legend", "aria-label": "Expert colours" },
    names.map((n) => el("li", {}, el("span", { class: "swatch", style: { background: expertColor(n) } }), n)));
}

/** Horizontal bars of {name: weight}, largest first, each in its expert's colour. */
export function weightBars(weights, { max = 1, label = "weights" } = {}) {
  const entries = Object.entries(weights || {}).sort((a, b) => b[1] - a[1]);
  if (!entries.length) return el("p", { class: "muted" }, "no experts (the base model alone)");
  return el("div", { class: "bars", role: "list", "aria-label": label },
    entries.map(([n, w]) => el("div", { class: "bar-row", role: "listitem" },
      el("span", { class: "bar-label", title: n }, n),
      el("span", { class: "bar-track" }, el("span", {
        class: "bar-fill", style: { width: `${Math.max(0, Math.min(1, w / (max || 1))) * 100}%`, background: expertColor(n) },
      })),
      el("span", { class: "bar-value" }, w.toFixed(3)))));
}

// -- sortable tables --------------------------------------------------------------------------

/**
 * A table whose column headers sort it (click or Enter). columns: [{key, label, value(row),
 * render(row), num}], value gives the sort key, render the cell (text or a node).
 */
export function sortableTable(columns, rows, { sortKey = null, desc = false, caption = null, rowAttrs = null } = {}) {
  let key = sortKey, descending = desc;
  const tbody = el("tbody");
  const ths = columns.map((c) => {
    const th = el("th", { scope: "col", class: c.num ? "num" : null });
    th.append(el("button", { type: "button", class: "sort", title: c.title || null, onclick: () => {
      descending = key === c.key ? !descending : !!c.num;
      key = c.key;
      draw();
    } }, c.label));
    return th;
  });
  const table = el("table", { class: "data" }, caption ? el("caption", {}, caption) : null,
    el("thead", {}, el("tr", {}, ths)), tbody);

  function value(c, r) {
    return c.value ? c.value(r) : r[c.key];
  }

  function draw() {
    const col = columns.find((c) => c.key === key);
    const sorted = [...rows];
    if (col) {
      sorted.sort((a, b) => {
        const x = value(col, a), y = value(col, b);
        if (x === y) return 0;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        const cmp = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
        return descending ? -cmp : cmp;
      });
    }
    columns.forEach((c, i) => ths[i].setAttribute("aria-sort", c.key === key ? (descending ? "descending" : "ascending") : "none"));
    tbody.replaceChildren(...sorted.map((r) => el("tr", rowAttrs ? rowAttrs(r) : {}, columns.map((c) => {
      const shown = c.render ? c.render(r) : value(c, r);
      return el("td", { class: c.num ? "num" : null }, shown === null || shown === undefined ? "–" : shown);
    }))));
  }

  draw();
  return el("div", { class: "table-wrap" }, table);
}

// -- small charts -----------------------------------------------------------------------------

export function sparkline(values, { width = 160, height = 36, color = "#3b75af" } = {}) {
  const box = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "spark", "aria-hidden": "true" });
  const vals = values.filter((v) => typeof v === "number" && Number.isFinite(v));
  if (vals.length < 2) return box;
  const max = Math.max(...vals), min = Math.min(0, ...vals);
  const span = max - min || 1;
  const step = width / (values.length - 1);
  let run = [];
  const flush = () => {
    if (run.length) box.append(svg(run.length > 1 ? "polyline" : "circle", run.length > 1
      ? { points: run.join(" "), fill: "none", stroke: color, "stroke-width": 1.5 }
      : { cx: run[0].split(",")[0], cy: run[0].split(",")[1], r: 1.5, fill: color }));
    run = [];
  };
  values.forEach((v, i) => {  // a value that is not a number leaves a gap
    if (!Number.isFinite(v)) return flush();
    run.push(`${(i * step).toFixed(1)},${(height - 2 - (v - min) / span * (height - 4)).toFixed(1)}`);
  });
  flush();
  return box;
}

/**
 * A heat grid: rows x cols of values in [lo, hi], each cell with a tooltip; `colorOf(r, c, v)`
 * picks a cell's colour (default: shades of blue).
 */
export function heatmap(rowLabels, colLabels, values, { lo = 0, hi = 1, cell = 22, labelWidth = 150, colorOf = null, title = "" } = {}) {
  const top = Math.min(120, 8 + 6 * Math.max(...colLabels.map((c) => String(c).length), 1));
  const width = labelWidth + cell * colLabels.length + top * 0.8, height = top + cell * rowLabels.length + 4;
  const box = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "heat", role: "img", "aria-label": title });
  colLabels.forEach((c, j) => box.append(svg("text", {
    x: labelWidth + cell * j + cell / 2, y: top - 4, transform: `rotate(-50 ${labelWidth + cell * j + cell / 2} ${top - 4})`, class: "axis",
  }, String(c).slice(0, 18))));
  rowLabels.forEach((r, i) => {
    box.append(svg("text", { x: labelWidth - 6, y: top + cell * i + cell * 0.68, "text-anchor": "end", class: "axis" }, String(r).slice(0, 24)));
    colLabels.forEach((c, j) => {
      const v = values[i][j];
      const t = v === null || v === undefined ? 0 : (v - lo) / ((hi - lo) || 1);
      const fill = colorOf ? colorOf(i, j, v) : tint("#2f6db3", 0.06 + 0.94 * Math.max(0, Math.min(1, t)));
      box.append(svg("rect", { x: labelWidth + cell * j, y: top + cell * i, width: cell - 1, height: cell - 1, fill },
        svg("title", {}, `${r} · ${c}: ${v === null || v === undefined ? "–" : fmtNum(v)}`)));
    });
  });
  return box;
}

/** Read a location hash "#/view/a/b?x=1" into {parts: [view, a, b], query}. */
export function parseHash(hash) {
  const [path, q] = (hash.replace(/^#\/?/, "") || "library").split("?");
  return { parts: path.split("/").map(decodeURIComponent), query: new URLSearchParams(q || "") };
}
