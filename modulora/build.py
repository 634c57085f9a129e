"""Building a library from a folder of task files.

Two ways (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"):

- `private`: one adapter per task file, added to the library under the task's name.
- `mbc` (model-based clustering): train a short LoRA per task, embed each by its flattened
  parameters (change of A from its seeded start, and B), sparsified to the largest magnitudes and
  reduced by a truncated SVD (or a random projection), cluster the embeddings with k-means on
  unit vectors (i.e. by cosine similarity), then train one LoRA per cluster on the union of its
  tasks' data, added as `cluster-<i>`. `clustering.json` and a similarity heatmap go to out_dir.

Layout of out_dir: `adapters/<name>/` (the library's adapters), `mbc/<task>/` (the short LoRAs),
`clustering.json`, `similarity.png`, `build.json` (the summary).

Every adapter is reused when its directory already holds a card with the same task, data hash,
training settings and base, so an interrupted build resumes where it stopped (and a half-trained
adapter resumes from its checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .adapters import AdapterConfig, adapter_state, attach, detach, read_adapter
from .data import Task, file_hash, load_task
from .library import LIBRARY_SCOPE
from .report import write_text_atomic
from .train import DEFAULT_LR, TrainConfig, train_adapter

MODES = ("private", "mbc")
TASK_SUFFIXES = (".jsonl", ".json", ".txt.bz2", ".txt")
DEFAULT_MBC_STEPS = 25
CLUSTERING_OBJECT, CLUSTERING_KIND = f"{LIBRARY_SCOPE}clustering", "mbc-clustering"  # where the library keeps it


class BuildError(ValueError):
    """A library cannot be built from these inputs; the message says why."""


# -- inputs ----------------------------------------------------------------------------------------

def find_task_files(data_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """(task name, path) of every task file in `data_dir`, sorted by name; the name is the file name
    without its data suffix."""
    d = Path(data_dir)
    if not d.exists():
        raise BuildError(f"data directory not found: {d}")
    if not d.is_dir():
        raise BuildError(f"{d} is not a directory; give a folder holding one data file per task")
    found: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        suffix = next((s for s in TASK_SUFFIXES if p.name.lower().endswith(s)), None)
        if suffix is None or p.name.startswith(".") or not p.is_file():
            continue
        name = p.name[: -len(suffix)]
        if name in found:
            raise BuildError(f"two files give task {name!r}: {found[name].name} and {p.name}; rename one")
        found[name] = p
    if not found:
        raise BuildError(f"no task files in {d} (expected one .jsonl, .json, .txt or .txt.bz2 file per task)")
    return sorted(found.items())


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BuildError(f"{what} must be a positive integer, got {value!r}")
    return value


# -- training with reuse ---------------------------------------------------------------------------

def _expected_train_config(adapter: AdapterConfig, cfg: TrainConfig) -> dict:
    """What train_adapter records as the card's train_config, after a JSON round trip."""
    raw = {**cfg.settings(), "lr": cfg.lr or DEFAULT_LR[adapter.type], "adapter": dataclasses.asdict(adapter)}
    return json.loads(json.dumps(raw, default=str))


def reusable(out: Path, task: str, data_hash: str, adapter: AdapterConfig, cfg: TrainConfig, base_id: str) -> bool:
    """Whether `out` already holds this adapter: same task, data, training settings and base."""
    try:
        card = json.loads((out / "card.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(card, dict) or not (out / "adapter_model.safetensors").is_file():
        return False
    return (card.get("task") == task and card.get("data_hash") == data_hash
            and card.get("train_config") == _expected_train_config(adapter, cfg)
            and (card.get("base_fingerprint") or {}).get("id") == base_id)


def train_or_reuse(base, task: Task, adapter: AdapterConfig, cfg: TrainConfig, out: Path, data_hash: str,
                    progress: bool) -> tuple[dict, bool]:
    if reusable(out, task.name, data_hash, adapter, cfg, base.fingerprint["id"]):
        return json.loads((out / "card.json").read_text()).get("metrics") or {}, True
    return train_adapter(base, task, adapter, cfg, out, data_hash=data_hash, progress=progress), False


def trained(base, jobs: list, adapter: AdapterConfig, progress: bool, ray, spec, desc: str, unit: str):
    """(job, metrics, reused) for each job (name, task, cfg, path, data_hash), in job order: trained
    here one after another, or (`ray`) the ones not reusable as Ray tasks, the driver writing each
    adapter into its path as a local build would. Units that failed raise a BuildError at the end."""
    if ray is None:
        bar = tqdm(jobs, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)
        for job in bar:
            name, task, cfg, path, data_hash = job
            bar.set_postfix({unit: name})
            yield (job, *train_or_reuse(base, task, adapter, cfg, path, data_hash, progress))
        return
    from .cluster import train_on_cluster

    fresh = [j for j in jobs if not reusable(j[3], j[1].name, j[4], adapter, j[2], base.fingerprint["id"])]
    with tqdm(total=len(fresh), desc=f"{desc} (ray)", unit=unit, disable=not progress, dynamic_ncols=True,
              mininterval=0.5) as bar:
        done, failed = train_on_cluster(ray, spec, fresh, adapter, bar)
    for job in jobs:
        path = job[3]
        if path in done:
            yield job, done[path], False
        elif path not in failed:
            yield job, json.loads((path / "card.json").read_text()).get("metrics") or {}, True
    if failed:
        raise BuildError(f"{len(failed)} of {len(fresh)} unit(s) failed on the Ray cluster (a rerun trains only "
                         "those): " + "; ".join(f"{p.name}: {why}" for p, why in failed.items()))


def _update_card(out: Path, extra: dict) -> None:
    path = out / "card.json"
    card = json.loads(path.read_text())
    card.update(extra)
    write_text_atomic(path, json.dumps(card, indent=2, default=str))


def add_if_new(library, name: str, out: Path, fingerprint: dict) -> tuple[int | None, bool]:
    """Add `out` to the library as `name` unless its latest version has this very content.
    Returns (version, added)."""
    if library is None:
        return None, False
    from .library import LibraryError, object_id_for
    from .validate import validate_adapter_dir

    try:
        latest = library.get(name)
    except LibraryError:
        latest = None
    if latest is not None:
        checked = validate_adapter_dir(out, fingerprint, library.limits)
        if object_id_for(checked.sha256) == latest.object_id:
            return latest.version, False
    return library.add(name, out, fingerprint).version, True


# -- model-based clustering ------------------------------------------------------------------------

def _flat(tensors: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().float().reshape(-1) for k in keys])


def lora_init(base, adapter: AdapterConfig, seed: int) -> dict[str, torch.Tensor]:
    """The tensors a LoRA starts from under `seed` (what train_adapter attaches)."""
    attach(base.model, adapter, seed=seed)
    try:
        return {k: v.clone() for k, v in adapter_state(base.model).items()}
    finally:
        detach(base.model)


def sparse_vectors(paths: list[Path], init: dict[str, torch.Tensor] | None, keep: float) -> tuple[list, int]:
    """Each adapter's flattened parameters (minus `init`), reduced to its `keep` share of largest
    magnitudes: a list of (sorted indices, values), and the full length."""
    keys = sorted(init) if init is not None else None
    out, length = [], None
    for p in paths:
        _, tensors, _ = read_adapter(p)
        if keys is None:
            keys = sorted(tensors)
        if sorted(tensors) != keys:
            raise BuildError(f"adapter {p} has other tensors than the others; all short adapters must "
                             "share one configuration")
        v = _flat(tensors, keys)
        if init is not None:
            v = v - _flat(init, keys)
        if length is not None and v.numel() != length:
            raise BuildError(f"adapter {p} has other shapes than the others")
        length = v.numel()
        k = max(1, min(length, int(round(keep * length))))
        idx = torch.topk(v.abs(), k).indices.sort().values
        out.append((idx, v[idx].clone()))
    return out, length


def _blocks(vectors: list, length: int, width: int):
    """Dense column blocks [N, <=width] of the sparse vectors, left to right."""
    for start in range(0, length, width):
        stop = min(length, start + width)
        block = torch.zeros(len(vectors), stop - start, dtype=torch.float64)
        for i, (idx, val) in enumerate(vectors):
            lo, hi = torch.searchsorted(idx, torch.tensor([start, stop])).tolist()
            block[i, idx[lo:hi] - start] = val[lo:hi].double()
        yield start, block


def reduce_vectors(vectors: list, length: int, dims: int = 256, method: str = "svd", seed: int = 0) -> np.ndarray:
    """Embeddings [N, <=dims]. `svd`: the rows' coordinates on the top `dims` singular directions
    (from the Gram matrix, so exact cosines when dims >= N); `random`: a seeded Gaussian projection."""
    n = len(vectors)
    width = max(4096, (32 << 20) // (8 * max(n, 1)))
    if method == "svd":
        gram = torch.zeros(n, n, dtype=torch.float64)
        for _, block in _blocks(vectors, length, width):
            gram += block @ block.T
        vals, vecs = torch.linalg.eigh(gram)
        vals, vecs = vals.flip(0), vecs.flip(1)
        k = max(1, min(dims, int((vals > vals[0] * 1e-12).sum())))
        return (vecs[:, :k] * vals[:k].clamp_min(0).sqrt()).numpy()
    if method == "random":
        emb = torch.zeros(n, dims, dtype=torch.float64)
        for start, block in _blocks(vectors, length, width):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
            proj = torch.randn(block.shape[1], dims, generator=gen, dtype=torch.float64) / dims ** 0.5
            emb += block @ proj
        return emb.numpy()
    raise BuildError(f"unknown reduction {method!r}; use svd or random")


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def kmeans(x: np.ndarray, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 100) -> tuple[np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding (best of `n_init` seeded runs). Every cluster is
    non-empty (k <= number of points). Returns (labels, inertia)."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise BuildError(f"cannot make {k} clusters of {n} points")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        centers = _kmeans_pp(x, k, rng)
        for _ in range(max_iter):
            dist = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
            labels = _fill_empty(dist.argmin(1), dist, k)
            new = np.stack([x[labels == j].mean(0) for j in range(k)])
            if np.allclose(new, centers, rtol=0, atol=1e-12):
                break
            centers = new
        dist = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
        labels = _fill_empty(dist.argmin(1), dist, k)
        inertia = float(sum(((x[labels == j] - x[labels == j].mean(0)) ** 2).sum() for j in range(k)))
        if best is None or inertia < best[1] - 1e-12:
            best = (labels, inertia)
    return best


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [int(rng.integers(len(x)))]
    for _ in range(1, k):
        d2 = ((x[:, None, :] - x[chosen][None]) ** 2).sum(-1).min(1)
        if d2.sum() > 0:
            chosen.append(int(rng.choice(len(x), p=d2 / d2.sum())))
        else:  # fewer distinct points than clusters: any point not yet chosen
            rest = [i for i in range(len(x)) if i not in chosen]
            chosen.append(int(rng.choice(rest)))
    return x[chosen].copy()


def _fill_empty(labels: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Give each empty cluster the worst-fitting point of a cluster that has more than one."""
    labels = labels.copy()
    for j in range(k):
        if (labels == j).any():
            continue
        counts = np.bincount(labels, minlength=k)
        movable = np.flatnonzero(counts[labels] > 1)
        worst = movable[np.argmax(dist[movable, labels[movable]])]
        labels[worst] = j
    return labels


def plot_similarity(sim: np.ndarray, names: list[str], clusters: list[int], path: Path, title: str) -> Path:
    """Heatmap of the task similarity matrix, tasks grouped by cluster, lines between clusters."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = sorted(range(len(names)), key=lambda i: (clusters[i], names[i]))
    m = sim[np.ix_(order, order)]
    n = len(names)
    side = min(40.0, max(5.0, 0.28 * n + 3))
    font = max(4.0, min(10.0, 400.0 / max(n, 1)))
    fig = Figure(figsize=(side + 1.5, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(m, cmap="viridis", vmin=min(0.0, float(m.min())), vmax=1.0, interpolation="nearest")
    labels = [f"{names[i]} [{clusters[i]}]" for i in order]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    bounds = [i for i in range(1, n) if clusters[order[i]] != clusters[order[i - 1]]]
    for b in bounds:
        ax.axhline(b - 0.5, color="white", linewidth=1.5)
        ax.axvline(b - 0.5, color="white", linewidth=1.5)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def cluster_tasks(base, short_dirs: list[Path], k: int, adapter: AdapterConfig, seed: int,
                  keep: float, dims: int, reduce: str) -> tuple[list[int], np.ndarray]:
    """Cluster labels (cluster 0 holds the first task, and so on in order of first member) and the
    cosine similarity matrix of the tasks' short adapters."""
    vectors, length = sparse_vectors(short_dirs, lora_init(base, adapter, seed), keep)
    emb = reduce_vectors(vectors, length, dims, reduce, seed)
    sim = cosine_matrix(emb)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    labels, _ = kmeans(emb / np.where(norms > 0, norms, 1), k, seed)
    first_seen: dict[int, int] = {}
    for lab in labels:
        first_seen.setdefault(int(lab), len(first_seen))
    return [first_seen[int(lab)] for lab in labels], sim


def store_clustering(library, clustering: dict) -> None:
    """Keep an MBC clustering (tasks, assignment, clusters, similarity) in the library itself, so
    the server's web page shows it; the newest build's replaces the last."""
    library.put_derived(CLUSTERING_OBJECT, CLUSTERING_KIND, json.dumps(clustering).encode())


def load_clustering(library) -> dict | None:
    raw = library.get_derived(CLUSTERING_OBJECT, CLUSTERING_KIND)
    return None if raw is None else json.loads(raw)


# -- the build -------------------------------------------------------------------------------------

def build_library(base, data_dir, out_dir, library=None, mode: str = "private", clusters: int | None = None,
                  steps: int | None = None, mbc_steps: int | None = None, adapter: AdapterConfig | None = None,
                  train: TrainConfig | None = None, keep: float = 0.1, dims: int = 256, reduce: str = "svd",
                  progress: bool = True, short_dir: str | os.PathLike | None = None, device: str = "auto",
                  ray=None) -> dict:
    """Train a library from the task files in `data_dir` and return a summary.

    base: a loaded `Base`, or a name for `load_base` (loaded after the inputs are checked, on
    `device` in `train.dtype`).
    library: a `Library`, a library folder, or None (adapters are only written to out_dir).
    mode: "private" (one adapter per task) or "mbc" (one per cluster of `clusters` clusters).
    steps: training steps of the library's adapters (default: `train`'s steps or epochs);
    mbc_steps: steps of the short per-task LoRAs MBC clusters by (default 25).
    short_dir: where the short LoRAs live (default out_dir/mbc); point it at a private build's
      `adapters/` folder with mbc_steps equal to its steps to cluster those adapters without training.
    keep / dims / reduce: MBC embedding: share of parameters kept, reduced size, "svd" or "random".
    ray: a `modulora.cluster.RayOptions`: each adapter (short and cluster LoRAs too) is trained as a
      Ray task on `base`'s name, on `device` (by its reservation) in `train.dtype`; the driver loads
      the base on its CPU (fingerprint, clustering) and alone writes out_dir and the library.
    """
    if mode not in MODES:
        raise BuildError(f"unknown build mode {mode!r}; use private or mbc")
    adapter = dataclasses.replace(adapter) if adapter is not None else AdapterConfig()
    adapter.validate()
    train = dataclasses.replace(train) if train is not None else TrainConfig()
    if steps is not None:
        train.steps = _positive_int(steps, "steps")
    tasks_files = find_task_files(data_dir)
    from .validate import ValidationError, validate_name

    for name, path in tasks_files:
        try:
            validate_name(name)
        except ValidationError:
            raise BuildError(f"task file {path.name} gives the task name {name!r}, which is not a valid "
                             "adapter name (use letters, digits, '.', '_' or '-')") from None
    if mode == "mbc":
        if adapter.type != "lora":
            raise BuildError(f"mbc clusters LoRA parameters; got adapter type {adapter.type!r}")
        if clusters is None:
            raise BuildError("mbc mode needs the number of clusters (clusters=K, --clusters K)")
        if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
            raise BuildError(f"the number of clusters must be at least 1, got {clusters!r}")
        if clusters > len(tasks_files):
            raise BuildError(f"cannot make {clusters} clusters from {len(tasks_files)} task(s); "
                             f"use at most {len(tasks_files)}")
        short_cfg = dataclasses.replace(train, steps=_positive_int(mbc_steps or DEFAULT_MBC_STEPS, "mbc_steps"))
        if not 0 < keep <= 1:
            raise BuildError(f"keep (share of parameters kept) must be in (0, 1], got {keep!r}")
        _positive_int(dims, "dims")
        if reduce not in ("svd", "random"):
            raise BuildError(f"unknown reduction {reduce!r}; use svd or random")
    elif clusters is not None:
        raise BuildError("clusters applies to mbc mode only")
    tasks = {name: load_task(path) for name, path in tasks_files}  # data errors before any training
    hashes = {name: file_hash(path) for name, path in tasks_files}
    for name in tasks:
        tasks[name].name = name
    if library is not None and not hasattr(library, "add"):
        from .library import Library

        library = Library(library)
    spec = None
    if ray is not None:
        from .cluster import check, unit_device

        check(ray)  # no ray installed, a cluster not there: said before anything loads
        unit_device(device, ray)
    if base is None or isinstance(base, (str, os.PathLike)):
        from .base import load_base

        base = load_base(base, device="cpu", dtype="fp32") if ray else load_base(base, device=device, dtype=train.dtype)
    if ray is not None:
        from .cluster import worker_base

        spec = worker_base(base, device, train.dtype, ray)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"mode": mode, "out_dir": str(out), "tasks": list(tasks), "adapters": [], "trained": [], "reused": []}

    def record(name: str, path: Path, members: list[str], metrics: dict, reused: bool, add: bool) -> None:
        version, added = add_if_new(library, name, path, base.fingerprint) if add else (None, False)
        summary["reused" if reused else "trained"].append(name)
        if add:
            summary["adapters"].append({"name": name, "path": str(path), "tasks": members, "reused": reused,
                                        "library_version": version, "added": added, "metrics": metrics})

    if mode == "private":
        jobs = [(name, task, train, out / "adapters" / name, hashes[name]) for name, task in tasks.items()]
        for (name, _, _, path, _), metrics, reused in trained(base, jobs, adapter, progress, ray, spec,
                                                               "build: adapters", "task"):
            record(name, path, [name], metrics, reused, add=True)
    else:
        short = {name: Path(short_dir) / name if short_dir else out / "mbc" / name for name in tasks}
        jobs = [(name, task, short_cfg, short[name], hashes[name]) for name, task in tasks.items()]
        for (name, _, _, path, _), metrics, reused in trained(base, jobs, adapter, progress, ray, spec,
                                                               "mbc: short adapters", "task"):
            record(f"mbc:{name}", path, [name], metrics, reused, add=False)
        names = list(tasks)
        labels, sim = cluster_tasks(base, [short[n] for n in names], clusters, adapter, train.seed,
                                    keep, dims, reduce)
        members = {f"cluster-{c}": [n for n, lab in zip(names, labels) if lab == c] for c in range(clusters)}
        clustering = {
            "tasks": names, "assignment": {n: f"cluster-{lab}" for n, lab in zip(names, labels)},
            "clusters": members, "similarity": np.round(sim, 6).tolist(),
            "settings": {"clusters": clusters, "mbc_steps": short_cfg.steps, "keep": keep, "dims": dims,
                         "reduce": reduce, "seed": train.seed, "parameters": "flattened LoRA A (minus its "
                         "seeded start) and B, all modules"},
        }
        (out / "clustering.json").write_text(json.dumps(clustering, indent=2))
        if library is not None:
            store_clustering(library, clustering)
        plot_similarity(sim, names, labels, out / "similarity.png",
                        f"MBC task similarity ({clusters} clusters, {len(names)} tasks)")
        summary.update(clusters=members, assignment=clustering["assignment"],
                       clustering=str(out / "clustering.json"), heatmap=str(out / "similarity.png"))
        jobs = [(cname, Task(name=cname, description="Tasks: " + ", ".join(member_names),
                             examples=[ex for n in member_names for ex in tasks[n].examples], format="mixed"),
                 train, out / "adapters" / cname,
                 hashlib.sha256("".join(f"{n}\0{hashes[n]}\n" for n in member_names).encode()).hexdigest())
                for cname, member_names in members.items()]
        for (cname, _, _, path, _), metrics, reused in trained(base, jobs, adapter, progress, ray, spec,
                                                                "mbc: cluster adapters", "cluster"):
            member_names = members[cname]
            if json.loads((path / "card.json").read_text()).get("cluster_tasks") != member_names:
                _update_card(path, {"cluster_tasks": member_names})
            record(cname, path, member_names, metrics, reused, add=True)
    (out / "build.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# -- command line ----------------------------------------------------------------------------------

def cmd_build(args) -> None:
    from .report import table

    alpha = args.alpha if args.alpha else 2.0 * args.rank
    targets = {"target_modules": tuple(args.target_modules.split(","))} if args.target_modules else {}
    adapter = AdapterConfig(type="lora", r=args.rank, alpha=alpha, dropout=args.dropout, **targets)
    train = TrainConfig(lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                        dtype=args.dtype, epochs=args.epochs, micro_batch=args.micro_batch)
    from .cli import ray_options
    from .library import Library

    summary = build_library(args.base, args.data, args.out, Library(args.library), device=args.device,
                            mode=args.mode, clusters=args.clusters, steps=args.steps, mbc_steps=args.mbc_steps,
                            adapter=adapter, train=train, keep=args.keep, dims=args.dims, reduce=args.reduce,
                            progress=not args.no_progress, ray=ray_options(args))
    print(table(["adapter", "tasks", "reused", "library version", "val loss"],
                [[a["name"], ", ".join(a["tasks"]), "yes" if a["reused"] else "no", a["library_version"],
                  (a["metrics"] or {}).get("val_loss")] for a in summary["adapters"]]))
    if summary["mode"] == "mbc":
        print(f"clustering: {summary['clustering']}\nheatmap: {summary['heatmap']}")
    print(f"trained {len(summary['trained'])}, reused {len(summary['reused'])}; summary in "
          f"{Path(summary['out_dir']) / 'build.json'}")


def add_build_command(subparsers) -> None:
    """Register `modulora build` (uses the global --library option)."""
    p = subparsers.add_parser("build", help="build a library from a folder of task files (one adapter per task, "
                                            "or per cluster of similar tasks with --mode mbc)")
    p.add_argument("--data", required=True, help="folder with one data file per task (task name = file name)")
    p.add_argument("--mode", default="private", choices=MODES)
    p.add_argument("--clusters", type=int, default=None, help="mbc: number of clusters K")
    p.add_argument("--out", required=True, help="working folder: adapters, short MBC adapters, clustering")
    p.add_argument("--base", default=None, help="base model (default: the bundled SmolLM2)")
    p.add_argument("--steps", type=int, default=None, help="steps per library adapter (default: --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--mbc-steps", type=int, default=None,
                   help=f"steps of the short MBC adapters (default {DEFAULT_MBC_STEPS})")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--target-modules", default=None, help="comma list (default: all linear)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=None,
                   help="rows per forward/backward pass: less memory, same update (default: the whole batch)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    from .cli import add_compute_args, add_ray_args

    add_compute_args(p)
    add_ray_args(p)
    p.add_argument("--keep", type=float, default=0.1, help="mbc: share of largest parameters kept")
    p.add_argument("--dims", type=int, default=256, help="mbc: embedding size after reduction")
    p.add_argument("--reduce", default="svd", choices=["svd", "random"], help="mbc: reduction")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_build)


__all__ = ["BuildError", "build_library", "find_task_files", "kmeans", "cosine_matrix", "cluster_tasks",
           "reduce_vectors", "sparse_vectors", "plot_similarity", "reusable", "train_or_reuse", "add_if_new", "add_build_command",
           "store_clustering", "load_clustering"]
