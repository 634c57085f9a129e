// The playground: a prompt, a route and sampling settings; the answer streams in, each token
// coloured by the expert that weighed most for it. Per-token weights come from the server's
// `token_routing` extension (Arrow: also per layer); a server without it is asked again
// without, and the tokens take the request's weights (exact for fixed routes, retrieval and
// learned, the mean for Arrow).
import {
  ApiError, el, errorOf, expertColor, headers, legend, loadAdapters, tint, topExpert, weightBars,
} from "./util.js";

const POLICIES = ["arrow", "retrieval", "learned"];
let tokenRoutingOff = false; // this server refused token_routing once: do not ask again

export async function render(root, route) {
  root.append(el("h1", {}, "Playground"));
  const adapters = await loadAdapters();
  const names = adapters.map((a) => a.name);
  const q = route.query;

  const prompt = el("textarea", { id: "pg-prompt", rows: 4, required: true, placeholder: "Ask something…" }, q.get("prompt") || "");
  const kind = el("select", { id: "pg-kind" }, ["adapter", "mixture", "arrow", "retrieval", "learned", "uniform", "base"]
    .map((k) => el("option", { value: k }, k === "mixture" ? "mixture (weights)" : k)));
  const adapter = el("select", { id: "pg-adapter" }, names.map((n) => el("option", { value: n }, n)));
  const mixture = el("input", { id: "pg-mixture", type: "text", placeholder: names.slice(0, 2).map((n, i) => `${n}:${i ? 0.3 : 0.7}`).join(",") || "a:0.7,b:0.3" });
  const topk = el("input", { id: "pg-topk", type: "number", min: 1, max: Math.max(1, names.length), value: 1 });
  // Arrow's settings (sent as the `arrow` extension field when they differ from the defaults)
  const arrowTemp = el("input", { id: "pg-arrow-temperature", type: "number", min: 0, step: "any", value: q.get("arrow_temperature") || 1 });
  const arrowProtos = el("select", { id: "pg-arrow-prototypes" },
    [["product", "B·A (Arrow)"], ["a", "A only"], ["spectral", "spectrum (SpectR)"]]
      .map(([v, label]) => el("option", { value: v }, label)));
  arrowProtos.value = q.get("arrow_prototypes") || "product";
  const arrowModules = el("input", { id: "pg-arrow-modules", type: "text", placeholder: "all (e.g. mlp)", title: "A regular expression over module names; the modules it does not match mix every expert equally", value: q.get("arrow_modules") || "" });
  const endpoint = el("select", { id: "pg-endpoint" }, el("option", { value: "chat" }, "chat (template)"), el("option", { value: "completion" }, "raw completion"));
  const temperature = el("input", { id: "pg-temperature", type: "number", min: 0, max: 2, step: 0.01, value: 0 });
  const topP = el("input", { id: "pg-top-p", type: "number", min: 0.01, max: 1, step: 0.01, value: 1 });
  const maxTokens = el("input", { id: "pg-max-tokens", type: "number", min: 1, max: 4096, value: 48 });
  const seed = el("input", { id: "pg-seed", type: "number", placeholder: "none" });
  const run = el("button", { id: "pg-run", class: "primary", type: "submit" }, "Generate");
  const stop = el("button", { id: "pg-stop", type: "button", disabled: true }, "Stop");

  const initial = q.get("route");
  if (initial) {
    if (names.includes(initial)) { kind.value = "adapter"; adapter.value = initial; }
    else if ([...kind.options].some((o) => o.value === initial)) kind.value = initial;
    else { kind.value = "mixture"; mixture.value = initial; }
  } else if (!names.length) kind.value = "base";

  const field = (label, input, cls = "") => el("label", { class: `field ${cls}` }, el("span", {}, label), input);
  const adapterField = field("Adapter", adapter), mixtureField = field("Weights (name:weight, …)", mixture), topkField = field("Top-k experts", topk);
  const arrowFields = el("div", { class: "grid", id: "pg-arrow" }, field("Arrow temperature", arrowTemp),
    field("Arrow prototypes", arrowProtos), field("Modules that route", arrowModules));
  const form = el("form", { class: "pg-form", "aria-label": "Request" },
    field("Prompt", prompt, "wide"),
    el("div", { class: "grid" }, field("Route", kind), adapterField, mixtureField, topkField, field("Endpoint", endpoint)),
    arrowFields,
    el("div", { class: "grid" }, field("Temperature", temperature), field("Top-p", topP), field("Max tokens", maxTokens), field("Seed", seed)),
    el("div", { class: "row" }, run, stop, el("span", { class: "muted" }, "Ctrl+Enter generates")));

  function syncFields() {
    adapterField.hidden = kind.value !== "adapter";
    mixtureField.hidden = kind.value !== "mixture";
    topkField.hidden = !POLICIES.includes(kind.value);
    arrowFields.hidden = kind.value !== "arrow";
  }
  kind.addEventListener("change", syncFields);
  syncFields();

  const out = el("div", { id: "pg-output", class: "tokens", tabindex: 0, role: "group",
    "aria-label": "Answer; arrow keys move between tokens to show their routing" });
  const status = el("p", { id: "pg-status", class: "muted", role: "status", "aria-live": "polite" });
  const legendBox = el("div", { id: "pg-legend" });
  const requestBox = el("div", { id: "pg-request-routing" });
  const detail = el("div", { id: "pg-token", class: "token-detail", "aria-live": "polite" },
    el("p", { class: "muted" }, "Hover, click or use the arrow keys on a token to see its weights."));
  root.append(el("div", { class: "pg" }, form,
    el("section", { class: "pg-answer", "aria-label": "Answer" }, status, out, legendBox,
      el("div", { class: "pg-side" },
        el("div", {}, el("h2", {}, "Request routing"), requestBox),
        el("div", {}, el("h2", {}, "Token"), detail)))));

  // -- tokens: spans coloured by their top expert; one is selected (click / arrows) ------------
  let tokens = [], selected = -1, pinned = false, controller = null;

  function colour(span, experts) {
    const top = topExpert(experts);
    if (!top) { span.style.background = ""; span.dataset.expert = "base"; return; }
    const w = experts[top];
    span.style.background = tint(expertColor(top), 0.18 + 0.55 * Math.max(0, Math.min(1, w)));
    span.style.boxShadow = `inset 0 -2px 0 ${expertColor(top)}`;
    span.dataset.expert = top;
    span.dataset.weight = w.toFixed(3);
  }

  function addToken(text, routing) {
    const i = tokens.length;
    const span = el("span", { class: "tok", "data-i": i, "data-layers": routing && routing.layers ? routing.layers.length : null }, text);
    const t = { text, span, experts: routing ? routing.experts || {} : null, layers: routing ? routing.layers || null : null, own: !!routing };
    if (t.experts) colour(span, t.experts);
    tokens.push(t);
    out.append(span);
    return t;
  }

  function showToken(i) {
    const t = tokens[i];
    if (!t) return;
    tokens.forEach((x, j) => x.span.classList.toggle("sel", j === i));
    selected = i;
    const parts = [el("p", {}, el("code", { class: "tok-text" }, JSON.stringify(t.text)), ` token ${i + 1} of ${tokens.length}`)];
    if (!t.experts) parts.push(el("p", { class: "muted" }, "No routing yet."));
    else {
      parts.push(el("h3", {}, t.layers ? "Mean over layers" : t.own ? "Weights" : "Weights (the request's)"), weightBars(t.experts, { label: "token weights" }));
      if (t.layers) parts.push(el("h3", {}, "Per layer"), layerGrid(t.layers));
    }
    detail.replaceChildren(...parts);
  }

  out.addEventListener("mouseover", (e) => { if (!pinned && e.target.dataset.i !== undefined) showToken(+e.target.dataset.i); });
  out.addEventListener("click", (e) => { if (e.target.dataset.i !== undefined) { pinned = true; showToken(+e.target.dataset.i); } });
  out.addEventListener("keydown", (e) => {
    const moves = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 };
    if (e.key in moves || e.key === "Home" || e.key === "End") {
      e.preventDefault();
      pinned = true;
      const next = e.key === "Home" ? 0 : e.key === "End" ? tokens.length - 1 : Math.max(0, Math.min(tokens.length - 1, (selected < 0 ? -1 : selected) + (moves[e.key] || 0)));
      showToken(next);
      tokens[next]?.span.scrollIntoView({ block: "nearest" });
    }
  });

  function routeText() {
    if (kind.value === "adapter") return adapter.value;
    if (kind.value === "mixture") return mixture.value.trim();
    return kind.value;
  }

  function body(withTokenRouting) {
    const b = { model: routeText(), stream: true, max_tokens: +maxTokens.value || 48, temperature: +temperature.value || 0, top_p: +topP.value || 1 };
    if (seed.value !== "") b.seed = +seed.value;
    if (POLICIES.includes(kind.value)) b.route_top_k = +topk.value || 1;
    if (kind.value === "arrow") {
      const a = {};
      if (arrowTemp.value !== "" && +arrowTemp.value !== 1) a.temperature = +arrowTemp.value;
      if (arrowProtos.value !== "product") a.prototypes = arrowProtos.value;
      if (arrowModules.value.trim()) a.modules = arrowModules.value.trim();
      if (Object.keys(a).length) b.arrow = a;
    }
    if (endpoint.value === "chat") b.messages = [{ role: "user", content: prompt.value }];
    else b.prompt = prompt.value;
    if (withTokenRouting) b.token_routing = true;
    return b;
  }

  async function post(withTokenRouting) {
    const url = endpoint.value === "chat" ? "/v1/chat/completions" : "/v1/completions";
    let resp;
    try {
      resp = await fetch(url, { method: "POST", signal: controller.signal, body: JSON.stringify(body(withTokenRouting)),
        headers: headers({ "Content-Type": "application/json" }) });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, `the server cannot be reached (${e.message})`);
    }
    if (resp.ok) return resp;
    const err = await errorOf(resp);
    if (withTokenRouting && resp.status === 400 && /token_routing/.test(err.message)) {
      tokenRoutingOff = true; // an older server: it refuses the field by name
      return post(false);
    }
    throw err;
  }

  async function generate(ev) {
    ev?.preventDefault();
    if (controller) return;
    if (!prompt.value.trim()) { status.className = "error"; status.textContent = "Write a prompt first."; prompt.focus(); return; }
    if (kind.value === "mixture" && !mixture.value.trim()) { status.className = "error"; status.textContent = "Give the mixture's weights, e.g. a:0.7,b:0.3."; mixture.focus(); return; }
    tokens = []; selected = -1; pinned = false;
    out.replaceChildren(); legendBox.replaceChildren(); requestBox.replaceChildren();
    detail.replaceChildren(el("p", { class: "muted" }, "Hover, click or use the arrow keys on a token to see its weights."));
    status.className = "muted"; status.textContent = "Waiting for the first token…";
    out.dataset.state = "streaming";
    controller = new AbortController();
    run.disabled = true; stop.disabled = false;
    const t0 = performance.now();
    let first = null, request = null, usage = null, finish = null, seen = new Set(), held = null;
    try {
      const resp = await post(!tokenRoutingOff);
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "", done = false;
      while (!done) {
        const { value, done: end } = await reader.read();
        if (end) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") { done = true; break; }
            const chunk = JSON.parse(data);
            if (chunk.error) throw new ApiError(chunk.error.status || 500, chunk.error.message || "the stream failed");
            for (const choice of chunk.choices || []) {
              if (choice.index) continue; // the playground asks for one answer
              const text = choice.delta ? choice.delta.content || "" : choice.text || "";
              const perToken = Array.isArray(choice.token_routing) ? choice.token_routing : null;
              if (perToken && perToken.length) {
                for (const r of perToken) {
                  Object.keys(r.experts || {}).forEach((n) => seen.add(n));
                  if (r.token) addToken(r.token, r);
                  else held = r; // its text waits for a whole character: it comes in a later chunk
                }
              } else if (text) { addToken(text, held); held = null; }
              if (text && first === null) { first = performance.now() - t0; status.textContent = "Streaming…"; }
              if (choice.finish_reason) finish = choice.finish_reason;
            }
            if (chunk.routing) request = chunk.routing.find((r) => !r.index) || chunk.routing[0] || request;
            if (chunk.usage) usage = chunk.usage;
            legendBox.replaceChildren(legend([...seen].sort()));
          }
          if (done) break;
        }
      }
      const experts = request ? request.experts || {} : {};
      Object.keys(experts).forEach((n) => seen.add(n));
      for (const t of tokens) if (!t.experts) { t.experts = experts; colour(t.span, experts); }
      legendBox.replaceChildren(seen.size ? legend([...seen].sort()) : el("p", { class: "muted" }, "Base model alone: no expert."));
      requestBox.replaceChildren(weightBars(experts, { label: "request routing" }),
        el("p", { class: "muted small" }, request && request.versions ? "versions: " + Object.entries(request.versions).map(([n, v]) => `${n} v${v}`).join(", ") : ""));
      const secs = (performance.now() - t0) / 1000;
      const n = usage ? usage.completion_tokens : tokens.length;
      const perTokenNote = tokens.some((t) => t.own) ? "coloured per token" : (kind.value === "arrow" || kind.value === "uniform")
        ? "coloured by the request's mean weights (this server sends no per-token routing)" : "coloured by the route's weights";
      status.className = "muted";
      status.textContent = `${n} tokens in ${secs.toFixed(2)} s` + (first !== null ? `, first after ${(first / 1000).toFixed(2)} s` : "") +
        (finish ? `, finished: ${finish}` : "") + `; ${perTokenNote}.`;
      out.dataset.state = "done";
    } catch (e) {
      out.dataset.state = "error";
      if (e.name === "AbortError") { status.className = "muted"; status.textContent = `Stopped after ${tokens.length} tokens.`; }
      else { status.className = "error"; status.setAttribute("role", "alert"); status.textContent = e.message; }
    } finally {
      controller = null;
      run.disabled = false; stop.disabled = true;
    }
  }

  form.addEventListener("submit", generate);
  prompt.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e); });
  stop.addEventListener("click", () => controller?.abort());
  return () => controller?.abort();
}

/** Layers (rows) by experts (columns), each cell the expert's colour at its weight. */
function layerGrid(layers) {
  const names = [...new Set(layers.flatMap((l) => Object.keys(l || {})))].sort();
  return el("div", { class: "table-wrap" }, el("table", { class: "layers" },
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "layer"), names.map((n) => el("th", { scope: "col", title: n }, n)))),
    el("tbody", {}, layers.map((l, i) => el("tr", {}, el("th", { scope: "row" }, String(i)), names.map((n) => {
      const w = (l || {})[n] || 0;
      return el("td", { style: { background: tint(expertColor(n), 0.08 + 0.9 * w) }, title: `layer ${i}, ${n}: ${w.toFixed(3)}` }, w ? w.toFixed(2) : "");
    }))))));
}
