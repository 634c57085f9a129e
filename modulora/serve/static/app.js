// The page's shell: the header (server, API key), and a hash router that hands the main area
// to one view at a time. Each view module exports render(root, route) and may return a
// cleanup function (timers, open streams) that runs when the view is left.
import { apiKey, el, getJSON, parseHash } from "./util.js";
import * as library from "./library.js";
import * as playground from "./playground.js";
import * as upload from "./upload.js";
import * as results from "./results.js";
import * as server from "./server.js";

const VIEWS = {
  library: library.renderList, adapter: library.renderAdapter, playground: playground.render,
  upload: upload.render, results: results.render, server: server.render,
};
const NAV_OF = { adapter: "library" };
let cleanup = null;

async function show() {
  const route = parseHash(location.hash);
  const name = VIEWS[route.parts[0]] ? route.parts[0] : "library";
  if (cleanup) { cleanup(); cleanup = null; }
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.view === (NAV_OF[name] || name)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const main = document.getElementById("main");
  const root = el("div", { class: "view", "data-view": name });
  main.replaceChildren(root);
  try {
    const done = await VIEWS[name](root, route);
    if (typeof done === "function") cleanup = done;
  } catch (e) {
    root.append(el("p", { class: "error", role: "alert" }, e.message || String(e)));
  }
}

function keyButton() {
  const button = document.getElementById("key-button");
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  const label = () => { button.textContent = apiKey.get() ? "API key ✓" : "API key"; };
  label();
  button.addEventListener("click", () => { input.value = apiKey.get(); dialog.showModal(); input.focus(); });
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "save") apiKey.set(input.value.trim());
    if (dialog.returnValue === "clear") apiKey.set("");
    input.value = "";
    label();
  });
}

async function serverInfo() {
  try {
    const info = await getJSON("/v1/info");
    const parts = [`base: ${info.base}`];
    if (info.api_key_required) parts.push("writes need the API key");
    document.getElementById("server-info").textContent = parts.join(" · ");
    if (!info.results) document.querySelector('nav a[data-view="results"]').title = "start the server with --results DIR";
  } catch (_) { /* the header stays plain */ }
}

keyButton();
serverInfo();
window.addEventListener("hashchange", show);
show();
