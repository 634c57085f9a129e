// The library: every adapter in a searchable, sortable table; an adapter's page (card, files,
// versions); and the MBC clustering (cluster map and similarity heatmap) when there is one.
import {
  ApiError, el, expertColor, fmtBytes, fmtCount, fmtDate, fmtNum, getJSON, heatmap, loadAdapters, send,
  sortableTable, svg, tint,
} from "./util.js";

const TYPES = ["all types", "lora", "series", "parallel", "prefix"];

export async function renderList(root) {
  root.append(el("h1", {}, "Library"));
  const adapters = await loadAdapters(true);
  const search = el("input", { type: "search", id: "library-search", placeholder: "Search name, task, description",
    "aria-label": "Search adapters" });
  const type = el("select", { "aria-label": "Adapter type" }, TYPES.map((t) => el("option", { value: t }, t)));
  const count = el("span", { class: "muted", "aria-live": "polite" });
  const holder = el("div");
  root.append(el("div", { class: "toolbar" }, search, type, count), holder);

  const columns = [
    { key: "name", label: "Name", render: (a) => el("a", { href: `#/adapter/${encodeURIComponent(a.name)}`, class: "adapter-link" }, a.name) },
    { key: "type", label: "Type", render: (a) => el("span", { class: `badge type-${a.type}` }, a.type) },
    { key: "version", label: "Version", num: true, render: (a) => a.versions.length > 1 ? `v${a.version} (${a.versions.length})` : `v${a.version}` },
    { key: "task", label: "Task" },
    { key: "num_params", label: "Params", num: true, render: (a) => fmtCount(a.num_params) },
    { key: "size_bytes", label: "Size", num: true, render: (a) => fmtBytes(a.size_bytes) },
    { key: "loss", label: "Train loss", num: true, value: (a) => a.metrics.train_loss ?? null, render: (a) => fmtNum(a.metrics.train_loss ?? null, 2) },
    { key: "created", label: "Created", render: (a) => fmtDate(a.created) },
    { key: "base_id", label: "Base", render: (a) => el("code", { title: a.base_name || "" }, (a.base_id || "–").slice(0, 12)) },
    { key: "sample", label: "Sample input", value: (a) => a.samples[0] || "", render: (a) => el("span", { class: "sample", title: a.samples.join("\n") }, a.samples[0] || "–") },
  ];

  function draw() {
    const q = search.value.trim().toLowerCase();
    const rows = adapters.filter((a) => (type.value === "all types" || a.type === type.value) &&
      (!q || [a.name, a.task, a.description, a.type].some((f) => f && String(f).toLowerCase().includes(q))));
    count.textContent = `${rows.length} of ${adapters.length} adapter${adapters.length === 1 ? "" : "s"}`;
    if (!adapters.length) {
      holder.replaceChildren(el("p", { class: "empty" }, "The library is empty. Add adapters with ",
        el("a", { href: "#/upload" }, "Upload"), " or modulora library add."));
      return;
    }
    holder.replaceChildren(sortableTable(columns, rows, { sortKey: "name", caption: "Adapters",
      rowAttrs: (a) => ({ "data-adapter": a.name }) }));
  }
  search.addEventListener("input", draw);
  type.addEventListener("change", draw);
  draw();

  const clustering = await getJSON("/v1/clustering").catch((e) => (e instanceof ApiError && e.status === 404 ? null : Promise.reject(e)));
  if (clustering) root.append(clusteringView(clustering, new Set(adapters.map((a) => a.name))));
}

// -- the clustering -----------------------------------------------------------------------------

function clusteringView(c, names) {
  const clusters = Object.keys(c.clusters || {}).sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
  const order = [...c.tasks].sort((a, b) => clusters.indexOf(c.assignment[a]) - clusters.indexOf(c.assignment[b]) || a.localeCompare(b));
  const idx = new Map(c.tasks.map((t, i) => [t, i]));
  const sim = order.map((a) => order.map((b) => c.similarity[idx.get(a)][idx.get(b)]));
  const colorOfCluster = (name) => expertColor(name);
  const section = el("section", { class: "clustering", "aria-labelledby": "clustering-title" },
    el("h2", { id: "clustering-title" }, `MBC clustering: ${clusters.length} clusters of ${c.tasks.length} tasks`),
    el("p", { class: "muted" }, "Tasks grouped by the cosine similarity of their short LoRAs' flattened parameters; " +
      "an MBC build trains one adapter per cluster (named after it)."));
  section.append(el("div", { class: "cluster-list" }, clusters.map((k) => el("div", { class: "cluster" },
    el("h3", {}, el("span", { class: "swatch", style: { background: colorOfCluster(k) } }),
      names.has(k) ? el("a", { href: `#/adapter/${encodeURIComponent(k)}` }, k) : k),
    el("ul", {}, (c.clusters[k] || []).map((t) => el("li", {}, t)))))));
  const lo = Math.min(...sim.flat()), hi = Math.max(...sim.flat().filter((v) => v < 0.9999), lo + 1e-6);
  section.append(el("div", { class: "charts" },
    el("figure", {}, mapOf(c, clusters, colorOfCluster), el("figcaption", {}, "Cluster map: tasks placed by their similarities (classical MDS)")),
    el("figure", {}, el("div", { class: "scroll" }, heatmap(order.map((t) => `${t} [${c.assignment[t]}]`), order, sim,
      { lo, hi, cell: order.length > 30 ? 12 : 20, labelWidth: 190, title: "Task similarity" })),
      el("figcaption", {}, `Similarity heatmap, tasks grouped by cluster (colour from ${fmtNum(lo, 2)} to ${fmtNum(hi, 2)})`))));
  return section;
}

/** 2-D classical MDS of the similarity matrix (top two eigenvectors by power iteration). */
function embed2d(sim) {
  const n = sim.length;
  const d2 = sim.map((row) => row.map((s) => Math.max(0, 2 - 2 * s)));
  const rowMean = d2.map((r) => r.reduce((a, b) => a + b, 0) / n);
  const all = rowMean.reduce((a, b) => a + b, 0) / n;
  const B = d2.map((r, i) => r.map((v, j) => -0.5 * (v - rowMean[i] - rowMean[j] + all)));
  const vecs = [];
  for (let k = 0; k < 2; k++) {
    let v = Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898 + k * 78.233 + 1));
    let lambda = 0;
    for (let it = 0; it < 200; it++) {
      let w = B.map((r) => r.reduce((a, x, j) => a + x * v[j], 0));
      for (const [u, l] of vecs) { const dot = w.reduce((a, x, j) => a + x * u[j], 0); w = w.map((x, j) => x - dot * u[j]); }
      const norm = Math.hypot(...w) || 1;
      lambda = norm;
      v = w.map((x) => x / norm);
    }
    vecs.push([v, lambda]);
  }
  return sim.map((_, i) => vecs.map(([v, l]) => v[i] * Math.sqrt(Math.max(l, 0))));
}

function mapOf(c, clusters, colorOf) {
  const W = 400, H = 260, pad = 24, right = 110; // room for the labels on the right
  const pts = embed2d(c.similarity);
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const sx = (x) => pad + (x - Math.min(...xs)) / ((Math.max(...xs) - Math.min(...xs)) || 1) * (W - 2 * pad - right);
  const sy = (y) => pad + (y - Math.min(...ys)) / ((Math.max(...ys) - Math.min(...ys)) || 1) * (H - 2 * pad);
  const box = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "map", role: "img", "aria-label": "Cluster map" });
  c.tasks.forEach((t, i) => {
    const color = colorOf(c.assignment[t]);
    box.append(svg("circle", { cx: sx(pts[i][0]), cy: sy(pts[i][1]), r: 6, fill: tint(color, 0.85), stroke: color },
      svg("title", {}, `${t} → ${c.assignment[t]}`)));
    if (c.tasks.length <= 24) box.append(svg("text", { x: sx(pts[i][0]) + 8, y: sy(pts[i][1]) + 4, class: "axis" }, t.slice(0, 22)));
  });
  return box;
}

// -- one adapter --------------------------------------------------------------------------------

export async function renderAdapter(root, route) {
  const name = route.parts[1] || "";
  const [info, listing] = await Promise.all([getJSON(`/v1/adapters/${encodeURIComponent(name)}`), loadAdapters(true)]);
  const entry = listing.find((a) => a.name === name);
  const card = info.card || {};
  const status = el("p", { role: "status", "aria-live": "polite" });
  root.append(el("p", {}, el("a", { href: "#/library" }, "← Library")),
    el("h1", {}, el("span", { class: "swatch big", style: { background: expertColor(name) } }), name,
      el("span", { class: `badge type-${info.type}` }, info.type), el("span", { class: "badge" }, `v${info.version}`)),
    el("p", { class: "lead" }, card.description || ""),
    el("div", { class: "row" },
      el("a", { class: "button primary", href: `#/playground?route=${encodeURIComponent(name)}` }, "Try in the playground"),
      el("button", { type: "button", class: "danger", onclick: () => remove(name, status) }, "Delete all versions")),
    status);

  const fp = card.base_fingerprint || {};
  root.append(el("section", {}, el("h2", {}, "Facts"), el("dl", { class: "facts" },
    fact("Type", info.type), fact("Task", card.task || "–"), fact("Version", `${info.version} of ${info.versions.join(", ")}`),
    fact("Parameters", `${fmtCount(info.num_params)} (${info.num_params})`), fact("Size", fmtBytes(info.total_bytes)),
    fact("Created", fmtDate(info.created)), fact("Base fingerprint", el("code", {}, info.base_id || "–"), fp.name ? ` (${fp.name})` : ""),
    fact("Object id", el("code", { class: "wrap" }, info.object_id)),
    fact("Files", Object.entries(info.files || {}).map(([f, m]) => el("div", {}, el("code", {}, f), ` ${fmtBytes(m.size)}`))),
    info.derived && info.derived.length ? fact("Cached", info.derived.join(", ")) : null,
    card.cluster_tasks ? fact("Cluster of", card.cluster_tasks.join(", ")) : null)));

  const samples = Array.isArray(card.samples) ? card.samples : [];
  root.append(el("section", {}, el("h2", {}, `Samples (${samples.length})`),
    samples.length ? el("ol", { class: "samples" }, samples.map((s) => el("li", {},
      el("span", {}, s), " ",
      el("a", { class: "small", href: `#/playground?route=${encodeURIComponent(name)}&prompt=${encodeURIComponent(s)}` }, "try")))) :
      el("p", { class: "muted" }, "The card holds no sample inputs.")));

  const metrics = card.metrics && typeof card.metrics === "object" ? card.metrics : {};
  root.append(el("section", {}, el("h2", {}, "Training metrics"), Object.keys(metrics).length ?
    el("dl", { class: "facts" }, Object.entries(metrics).map(([k, v]) => fact(k, typeof v === "object" && v !== null ? JSON.stringify(v) : fmtNum(v)))) :
    el("p", { class: "muted" }, "No metrics on the card.")));

  const versions = entry ? entry.versions : info.versions.map((v) => ({ version: v }));
  root.append(el("section", {}, el("h2", {}, "Versions"), sortableTable([
    { key: "version", label: "Version", num: true, render: (v) => `v${v.version}` },
    { key: "created", label: "Created", render: (v) => fmtDate(v.created) },
    { key: "type", label: "Type" },
    { key: "num_params", label: "Params", num: true, render: (v) => fmtCount(v.num_params) },
    { key: "object_id", label: "Object id", render: (v) => el("code", {}, (v.object_id || "–").slice(0, 16)) },
  ], versions, { sortKey: "version", desc: true })));

  root.append(el("section", {}, el("h2", {}, "Card and config"),
    el("details", {}, el("summary", {}, "Training settings"), el("pre", {}, JSON.stringify(card.train_config || {}, null, 2))),
    el("details", {}, el("summary", {}, "Adapter config"), el("pre", {}, JSON.stringify(info.config || {}, null, 2))),
    el("details", {}, el("summary", {}, "Whole card"), el("pre", {}, JSON.stringify(card, null, 2)))));
}

function fact(label, ...value) {
  return el("div", { class: "fact" }, el("dt", {}, label), el("dd", {}, ...value));
}

async function remove(name, status) {
  if (!confirm(`Delete every version of ${name}?`)) return;
  try {
    const out = await send("DELETE", `/v1/adapters/${encodeURIComponent(name)}`);
    status.className = "ok";
    status.textContent = `Deleted ${name} (${out.versions_removed} version(s)).`;
    await loadAdapters(true);
    setTimeout(() => { location.hash = "#/library"; }, 800);
  } catch (e) {
    status.className = "error";
    status.textContent = e.message;
  }
}
