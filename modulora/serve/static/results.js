// Results: the evaluation reports under the server's --results folder (results.json of
// `modulora eval` and the experiments): a list, then one report as a sortable score table,
// a bar chart of the averages, the routing heatmap per method and a few predictions.
import { ApiError, el, fmtDate, getJSON, heatmap, sortableTable } from "./util.js";

const pct = (x) => (typeof x === "number" ? (100 * x).toFixed(1) : "–");

export async function render(root, route) {
  const name = route.parts.slice(1).join("/");
  return name ? renderOne(root, name) : renderList(root);
}

async function renderList(root) {
  root.append(el("h1", {}, "Results"));
  let list;
  try {
    list = (await getJSON("/v1/results")).data;
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      root.append(el("p", { class: "empty" }, "No results folder: start the server with ",
        el("code", {}, "modulora serve --results DIR"), " (the --out of modulora eval, or experiments/results)."));
      return;
    }
    throw e;
  }
  if (!list.length) {
    root.append(el("p", { class: "empty" }, "The results folder holds no results.json yet."));
    return;
  }
  const best = (r) => Object.entries(r.average || {}).sort((a, b) => b[1] - a[1])[0] || [null, null];
  root.append(sortableTable([
    { key: "name", label: "Report", render: (r) => el("a", { href: `#/results/${r.name.split("/").map(encodeURIComponent).join("/")}` }, r.name) },
    { key: "tasks", label: "Tasks", num: true, value: (r) => r.tasks.length },
    { key: "methods", label: "Methods", num: true, value: (r) => r.methods.length },
    { key: "examples", label: "Examples", num: true, value: (r) => Object.values(r.n || {}).reduce((a, b) => a + b, 0) },
    { key: "best", label: "Best method (average %)", value: (r) => best(r)[1], render: (r) => best(r)[0] ? `${best(r)[0]} (${pct(best(r)[1])})` : "–" },
    { key: "modified", label: "Written", num: true, render: (r) => fmtDate(new Date(r.modified * 1000).toISOString()) },
  ], list, { sortKey: "name", caption: "Evaluation reports" }));
}

async function renderOne(root, name) {
  const r = await getJSON(`/v1/results/${name.split("/").map(encodeURIComponent).join("/")}`);
  root.append(el("p", {}, el("a", { href: "#/results" }, "← Results")), el("h1", {}, name),
    el("p", { class: "muted" }, `${r.tasks.length} tasks, ${r.methods.length} methods, ${r.n_predictions} predictions; scores in %.`));

  const depth = Math.max(...r.tasks.map((t) => (r.metrics[t] || []).length), 1);
  const metric = el("select", { "aria-label": "Metric" }, Array.from({ length: depth }, (_, i) =>
    el("option", { value: i }, i === 0 ? "main metric (each task's first)" : `metric ${i + 1} (${[...new Set(r.tasks.map((t) => (r.metrics[t] || [])[i]).filter(Boolean))].join(", ")})`)));
  const holder = el("div");
  root.append(el("section", {}, el("h2", {}, "Scores"), depth > 1 ? el("div", { class: "toolbar" }, el("label", {}, "Metric ", metric)) : null, holder));

  function score(m, t, i) {
    const key = (r.metrics[t] || [])[i];
    const v = ((r.scores[m] || {})[t] || {})[key];
    return typeof v === "number" ? v : null;
  }
  function draw() {
    const i = +metric.value;
    const rows = r.methods.map((m) => {
      const row = { method: m };
      const vals = r.tasks.map((t) => score(m, t, i)).filter((v) => v !== null);
      r.tasks.forEach((t) => { row[t] = score(m, t, i); });
      row.average = i === 0 && r.average && typeof r.average[m] === "number" ? r.average[m] : vals.length ? vals.reduce((a, b) => a + b, 0) / vals.length : null;
      return row;
    });
    const bestOf = {};
    for (const k of [...r.tasks, "average"]) bestOf[k] = Math.max(...rows.map((x) => x[k] ?? -1));
    const cell = (k) => (x) => el("span", { class: x[k] !== null && x[k] === bestOf[k] && x[k] > 0 ? "best" : null,
      style: { background: x[k] === null ? "" : `rgba(47,109,179,${(0.05 + 0.5 * x[k]).toFixed(3)})` } }, pct(x[k]));
    holder.replaceChildren(
      sortableTable([{ key: "method", label: "Method" }, { key: "average", label: "Average", num: true, render: cell("average") },
        ...r.tasks.map((t) => ({ key: t, label: t.length > 26 ? t.slice(0, 24) + "…" : t, title: t, num: true, render: cell(t) }))],
      rows, { sortKey: "average", desc: true, caption: "Score by method and task (best in bold)" }),
      averageChart(rows));
  }
  metric.addEventListener("change", draw);
  draw();

  const routed = r.methods.filter((m) => r.tasks.some((t) => Object.keys((r.routing[m] || {})[t] || {}).length));
  if (routed.length) {
    const pick = el("select", { "aria-label": "Routed method" }, routed.map((m) => el("option", { value: m }, m)));
    const box = el("div", { class: "scroll" });
    const drawRouting = () => {
      const m = pick.value;
      const experts = [...new Set(r.tasks.flatMap((t) => Object.keys(r.routing[m][t] || {})))].sort();
      const grid = r.tasks.map((t) => experts.map((e) => (r.routing[m][t] || {})[e] ?? 0));
      const hi = Math.max(...grid.flat(), 1e-9);
      box.replaceChildren(heatmap(r.tasks, experts, grid, { hi, cell: experts.length > 24 ? 14 : 22, labelWidth: 230, title: `Routing of ${m}` }),
        el("p", { class: "muted small" }, `Darkest: weight ${hi.toFixed(2)}.`));
    };
    pick.addEventListener("change", drawRouting);
    drawRouting();
    root.append(el("section", {}, el("h2", {}, "Routing"), el("p", { class: "muted" }, "Mean weight each expert got on each task's requests."),
      el("div", { class: "toolbar" }, el("label", {}, "Method ", pick)), box));
  }

  if (r.examples && r.examples.length) {
    const pickM = el("select", { "aria-label": "Method of the examples" }, r.methods.map((m) => el("option", { value: m }, m)));
    const box = el("div");
    const drawEx = () => box.replaceChildren(sortableTable([
      { key: "task", label: "Task" },
      { key: "prediction", label: "Prediction", render: (x) => el("span", { class: "sample" }, String(x.prediction ?? "")) },
      { key: "references", label: "Expected", value: (x) => (x.references || []).join(" | ") },
      { key: "score", label: "Score", num: true, value: (x) => Object.values(x.scores || {})[0] ?? null, render: (x) => pct(Object.values(x.scores || {})[0]) },
    ], r.examples.filter((x) => x.method === pickM.value), { sortKey: "task" }));
    pickM.addEventListener("change", drawEx);
    drawEx();
    root.append(el("section", {}, el("h2", {}, "Examples"), el("div", { class: "toolbar" }, el("label", {}, "Method ", pickM)), box));
  }
  root.append(el("details", {}, el("summary", {}, "Settings"), el("pre", {}, JSON.stringify(r.config || {}, null, 2))));
}

function averageChart(rows) {
  const sorted = [...rows].sort((a, b) => (b.average ?? 0) - (a.average ?? 0));
  const max = Math.max(...sorted.map((x) => x.average ?? 0), 1e-9);
  return el("figure", { class: "avg-chart" }, el("figcaption", {}, "Average by method (%)"),
    el("div", { class: "bars" }, sorted.map((x) => el("div", { class: "bar-row" },
      el("span", { class: "bar-label", title: x.method }, x.method),
      el("span", { class: "bar-track" }, el("span", { class: "bar-fill", style: { width: `${((x.average ?? 0) / max) * 100}%`, background: "var(--accent)" } })),
      el("span", { class: "bar-value" }, pct(x.average))))));
}
