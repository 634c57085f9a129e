// Server: live figures from /metrics (Prometheus text) and /health, polled every 2 s while this
// view is open; rates and interval means are computed here from the counters' differences.
import { el, fmtNum, getJSON, sparkline } from "./util.js";

const PERIOD_MS = 2000, WINDOW_MS = 10000, KEEP = 90; // poll, rate window, points per line
const COMPLETIONS = ['endpoint="/v1/completions"', 'endpoint="/v1/chat/completions"'];

/** {name: [{labels, value}]} from the text format. */
export function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/);
    if (!m) continue;
    (out[m[1]] ||= []).push({ labels: m[2] || "", value: Number(m[3]) });
  }
  return out;
}

const sum = (metrics, name, filter = null) => (metrics[name] || [])
  .filter((s) => !filter || filter.some((f) => s.labels.includes(f))).reduce((a, s) => a + s.value, 0);

const FIGURES = [
  { id: "rps", label: "Requests/s", rate: (m) => sum(m, "modulora_requests_total") },
  { id: "tps", label: "Generated tokens/s", rate: (m) => sum(m, "modulora_generated_tokens_total") },
  { id: "latency", label: "Completion latency (s, mean)", ratio: (m) => [sum(m, "modulora_request_duration_seconds_sum", COMPLETIONS), sum(m, "modulora_request_duration_seconds_count", COMPLETIONS)] },
  { id: "batch", label: "Prefill batch (mean)", ratio: (m) => [sum(m, "modulora_batch_size_sum"), sum(m, "modulora_batch_size_count")] },
  { id: "decode", label: "Decode batch (mean rows)", ratio: (m) => [sum(m, "modulora_decode_batch_size_sum"), sum(m, "modulora_decode_batch_size_count")] },
  { id: "queue", label: "Queue", gauge: (m) => sum(m, "modulora_queue_depth") },
  { id: "running", label: "Running rows", gauge: (m) => sum(m, "modulora_running_rows") },
  { id: "resident", label: "Resident experts", gauge: (m) => sum(m, "modulora_adapter_cache_resident"),
    note: (m) => { const c = sum(m, "modulora_adapter_cache_capacity"); return c ? `of ${c}` : "no bound"; } },
];

export async function render(root) {
  root.append(el("h1", {}, "Server"));
  const health = el("p", { id: "srv-health", role: "status" }, "Reading /metrics…");
  const cards = new Map(FIGURES.map((f) => [f.id, { value: el("span", { class: "value" }, "–"), note: el("span", { class: "muted small" }), spark: el("span") }]));
  const totals = el("div", { id: "srv-totals" });
  root.append(health,
    el("div", { class: "cards" }, FIGURES.map((f) => {
      const c = cards.get(f.id);
      return el("div", { class: "card", "data-figure": f.id }, el("span", { class: "label" }, f.label), c.value, c.note, c.spark);
    })),
    el("p", { class: "muted small" }, `Rates and means over the last ${WINDOW_MS / 1000} s (generated tokens count when a request ends); ` +
      `the lines show the last ${KEEP * PERIOD_MS / 60000} minutes.`),
    el("h2", {}, "Totals since start"), totals);

  const history = new Map(FIGURES.map((f) => [f.id, []]));
  const snapshots = []; // {m, t}: the counters over the rate window
  let timer = null, stopped = false;

  async function tick() {
    try {
      const [text, h] = await Promise.all([fetch("/metrics").then((r) => (r.ok ? r.text() : Promise.reject(new Error(`/metrics: HTTP ${r.status}`)))),
        getJSON("/health").catch((e) => ({ status: e.message }))]);
      const m = parseMetrics(text), now = performance.now();
      while (snapshots.length > 1 && now - snapshots[1].t >= WINDOW_MS) snapshots.shift();
      const last = snapshots[0] || null;
      health.className = h.status === "ok" ? "ok" : "error";
      health.textContent = `Health: ${h.status}` + (h.storage && h.storage !== "ok" ? ` (storage ${h.storage})` : "") +
        (h.storage_free_bytes !== undefined ? ` · ${(h.storage_free_bytes / 2 ** 30).toFixed(1)} GiB free for the library` : "");
      for (const f of FIGURES) {
        let v = null;
        if (f.gauge) v = f.gauge(m);
        else if (last && f.rate) v = Math.max(0, (f.rate(m) - f.rate(last.m)) / ((now - last.t) / 1000));
        else if (last && f.ratio) {
          const [s, c] = f.ratio(m), [s0, c0] = f.ratio(last.m);
          v = c > c0 ? (s - s0) / (c - c0) : NaN; // nothing new in the interval: no mean, a gap in the line
        }
        const hist = history.get(f.id);
        if (v !== null) { hist.push(v); if (hist.length > KEEP) hist.shift(); }
        if (Number.isNaN(v)) v = null;
        const c = cards.get(f.id);
        c.value.textContent = v === null ? "–" : fmtNum(v, v < 10 ? 2 : 1);
        c.note.textContent = f.note ? f.note(m) : "";
        c.spark.replaceChildren(sparkline(hist));
      }
      totals.replaceChildren(totalsTable(m));
      snapshots.push({ m, t: now });
    } catch (e) {
      health.className = "error";
      health.textContent = `Cannot read the server's figures: ${e.message}`;
    }
    if (!stopped) timer = setTimeout(tick, PERIOD_MS);
  }
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

function totalsTable(m) {
  const rows = [
    ["Requests", sum(m, "modulora_requests_total")],
    ["Completion requests", sum(m, "modulora_requests_total", COMPLETIONS)],
    ["Errors (4xx / 5xx)", (m.modulora_requests_total || []).filter((s) => /status="[45]/.test(s.labels)).reduce((a, s) => a + s.value, 0)],
    ["Prompt tokens", sum(m, "modulora_prompt_tokens_total")],
    ["Generated tokens", sum(m, "modulora_generated_tokens_total")],
    ["Prefill passes", sum(m, "modulora_batches_total")],
    ["Decode steps", sum(m, "modulora_decode_steps_total")],
    ["Stopped early (disconnect / timeout)", sum(m, "modulora_requests_stopped_total")],
    ["Expert cache hits / misses / evictions", `${sum(m, "modulora_adapter_cache_hits_total")} / ${sum(m, "modulora_adapter_cache_misses_total")} / ${sum(m, "modulora_adapter_cache_evictions_total")}`],
    ["Prefix cache hits / misses", `${sum(m, "modulora_prefix_cache_total", ['result="hit"'])} / ${sum(m, "modulora_prefix_cache_total", ['result="miss"'])}`],
    ["Uploads stored / refused", `${sum(m, "modulora_adapter_uploads_total", ['result="created"'])} / ${sum(m, "modulora_adapter_uploads_total", ['result="rejected"'])}`],
    ["Deletes", sum(m, "modulora_adapter_deletes_total")],
  ];
  return el("div", { class: "table-wrap" }, el("table", { class: "data compact" },
    el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("th", { scope: "row" }, k), el("td", { class: "num" }, typeof v === "number" ? fmtNum(v) : v))))));
}
