// Upload: a PEFT adapter folder, its files, or one .tar.gz / .zip, under a name. The server
// validates it (base fingerprint, shapes, finite weights, no pickles); its refusal is shown in
// its own words, and a stored adapter is routable at once.
import { el, fmtBytes, loadAdapters, send } from "./util.js";

const ARCHIVES = [".tar.gz", ".tgz", ".tar", ".zip"];

export async function render(root) {
  root.append(el("h1", {}, "Upload an adapter"),
    el("p", { class: "muted" }, "A PEFT adapter folder (adapter_config.json and adapter_model.safetensors, optionally card.json), " +
      "its files, or one .tar.gz / .zip of them. Re-using a name adds a new version."));
  let files = [];
  const name = el("input", { id: "up-name", type: "text", required: true, autocomplete: "off", placeholder: "e.g. capitals" });
  const pickFiles = el("input", { id: "up-files", type: "file", multiple: true, class: "visually-hidden" });
  const pickFolder = el("input", { id: "up-folder", type: "file", webkitdirectory: true, class: "visually-hidden" });
  const list = el("ul", { id: "up-list", class: "file-list" });
  const drop = el("div", { id: "up-drop", class: "drop", tabindex: 0, role: "button",
    "aria-label": "Drop an adapter folder, its files or an archive here, or press Enter to choose files" },
  el("strong", {}, "Drop a folder, files or an archive here"),
  el("div", { class: "row" },
    el("label", { class: "button", for: "up-files" }, "Choose files…"),
    el("label", { class: "button", for: "up-folder" }, "Choose a folder…")), pickFiles, pickFolder, list);
  const submit = el("button", { id: "up-submit", class: "primary", type: "submit" }, "Upload");
  const result = el("div", { id: "up-result", "aria-live": "polite" });
  const form = el("form", { class: "upload", "aria-label": "Upload" },
    el("label", { class: "field" }, el("span", {}, "Name"), name), drop, el("div", { class: "row" }, submit), result);
  root.append(form);

  function setFiles(chosen, folder = null) {
    const skipped = chosen.filter((f) => f.nested).length;
    files = chosen.filter((f) => !f.nested).map((f) => f.file);
    if (!name.value.trim()) {
      const guess = folder || (files.length === 1 ? ARCHIVES.reduce((n, s) => (n.toLowerCase().endsWith(s) ? n.slice(0, -s.length) : n), files[0].name) : "");
      if (guess && !guess.includes(".")) name.value = guess;
    }
    list.replaceChildren(...files.map((f) => el("li", {}, el("code", {}, f.name), ` ${fmtBytes(f.size)}`)));
    if (skipped) list.append(el("li", { class: "muted" }, `${skipped} file(s) in sub-folders left out: an adapter's files sit at its top level`));
  }

  pickFiles.addEventListener("change", () => setFiles([...pickFiles.files].map((file) => ({ file }))));
  pickFolder.addEventListener("change", () => {
    const chosen = [...pickFolder.files].map((file) => ({ file, nested: (file.webkitRelativePath || "").split("/").length > 2 }));
    const folder = (pickFolder.files[0]?.webkitRelativePath || "").split("/")[0] || null;
    setFiles(chosen, folder);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); pickFiles.click(); } });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const entries = [...e.dataTransfer.items].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry()).filter(Boolean);
    if (entries.length === 1 && entries[0].isDirectory) setFiles(await folderFiles(entries[0]), entries[0].name);
    else setFiles([...e.dataTransfer.files].map((file) => ({ file })));
  });

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    result.replaceChildren();
    if (!name.value.trim()) return fail("Give the adapter a name.");
    if (!files.length) return fail("Choose the adapter's files, its folder or an archive first.");
    const data = new FormData();
    data.append("name", name.value.trim());
    for (const f of files) data.append("file", f, f.name);
    submit.disabled = true;
    result.append(el("p", { class: "muted" }, "Uploading and validating…"));
    try {
      const rec = await send("POST", "/v1/adapters", data);
      await loadAdapters(true);
      result.replaceChildren(el("p", { class: "ok", role: "status" },
        `Stored ${rec.name} v${rec.version} (${rec.type}, ${rec.num_params} parameters). It is routable now: `,
        el("a", { href: `#/adapter/${encodeURIComponent(rec.name)}` }, "its page"), " · ",
        el("a", { href: `#/playground?route=${encodeURIComponent(rec.name)}` }, "try it")));
    } catch (err) {
      fail(err.message, err.status);
    } finally {
      submit.disabled = false;
    }
  });

  function fail(message, status) {
    result.replaceChildren(el("p", { class: "error", role: "alert", id: "up-error" },
      status ? `Refused (${status}): ` : "", message, status && status !== 401 ? " The library is unchanged." : ""));
  }
}

/** The files at the top level of a dropped folder (sub-folders are marked nested). */
async function folderFiles(dir) {
  const reader = dir.createReader();
  const entries = [];
  for (;;) {
    const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
    if (!batch.length) break;
    entries.push(...batch);
  }
  const out = [];
  for (const entry of entries) {
    if (entry.isFile) out.push({ file: await new Promise((ok, bad) => entry.file(ok, bad)) });
    else out.push({ file: null, nested: true });
  }
  return out;
}
