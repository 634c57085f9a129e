"""What the four experiments share: their settings (quick on the tiny model, full on SmolLM2),
the data folder, training with reuse, the library of SNI experts, and the report they write."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import AdapterConfig
from ..data import DataError
from ..evaluate import paired_difference
from ..report import write_text_atomic
from ..train import TrainConfig

# The SNI library: short-answer tasks (country facts, lexical relations, arithmetic, classification,
# extraction, QA, story understanding). Experiments 3-4 use the first 16; experiment 2 all 48.
LIBRARY_TASKS = [
    "task1146_country_capital", "task1314_country_abbreviation", "task1317_country_calling_code",
    "task1320_country_domain_tld", "task1508_wordnet_antonyms", "task094_conala_calculate_mean",
    "task861_asdiv_addsub_question_answering", "task868_mawps_singleop_question_answering",
    "task1289_trec_classification", "task1447_drug_extraction_ade",
    "task1452_location_entity_extraction_btc_corpus", "task033_winogrande_answer_generation",
    "task591_sciq_answer_generation", "task1413_dart_object_identification",
    "task922_event2mind_word_generation", "task898_freebase_qa_answer_generation",
    # experiment 2's larger library adds these 32
    "task1319_country_by_barcode_prefix", "task1448_disease_entity_extraction_ncbi_dataset",
    "task1451_drug_dose_extraction", "task1480_gene_extraction_jnlpba_dataset",
    "task143_odd-man-out_classification_generate_category", "task1327_qa_zre_answer_generation_from_question",
    "task1342_amazon_us_reviews_title", "task1504_hatexplain_answer_generation", "task1518_limit_answer_generation",
    "task151_tomqa_find_location_easy_clean", "task1581_eqasc-perturbed_answer_generation",
    "task1596_event2mind_text_generation_2", "task1601_webquestions_answer_generation",
    "task179_participant_extraction", "task217_rocstories_ordering_answer_generation",
    "task219_rocstories_title_answer_generation", "task222_rocstories_two_chioce_slotting_classification",
    "task227_clariq_classification", "task292_storycommonsense_character_text_generation",
    "task293_storycommonsense_emotion_text_generation", "task300_storycloze_order_generation",
    "task344_hybridqa_answer_generation", "task361_spolin_yesand_prompt_response_classification",
    "task388_torque_token_classification", "task444_com_qa_question_paraphrases_answer_generation",
    "task471_haspart_answer_generation", "task582_naturalquestion_answer_generation",
    "task615_moviesqa_answer_generation", "task820_protoqa_answer_generation",
    "task835_mathdataset_answer_generation", "task863_asdiv_multiop_question_answering",
    "task900_freebase_qa_category_classification",
]
# Held-out tasks that no library expert sees, each with a relative in the library (another country
# fact, a lexical relation, an extraction, ...). Experiment 2 uses all 16 (the first 8 as before).
HELD_OUT_TASKS = [
    "task1425_country_iso_numeric", "task1582_bless_hypernym_generation",
    "task862_asdiv_multidiv_question_answering", "task1411_dart_subject_identification",
    "task1479_organization_entity_extraction_btc_corpus", "task1483_chemical_extraction_chemprot_dataset",
    "task924_event2mind_word_generation", "task1293_kilt_tasks_hotpotqa_question_answering",
    "task1426_country_independence_year", "task1481_gene_extraction_bc2gm_dataset",
    "task867_mawps_multiop_question_answering", "task294_storycommonsense_motiv_text_generation",
    "task899_freebase_qa_topic_generation", "task1485_organ_extraction_anem_dataset",
    "task382_hybridqa_answer_generation", "task181_outcome_extraction",
]
HOLDOUT = 0.1  # share of every SNI task kept out of training; evaluation draws from it


@dataclass
class Settings:
    """Sizes of one mode; `quick` runs the whole pipeline on the tiny model in about a minute."""
    base: str | None          # None: the bundled SmolLM2-135M-Instruct
    library_tasks: int        # experiments 3-4's library
    held_out_tasks: int
    steps: int                # training steps of each SNI expert (experiments 3-4)
    zs_library_tasks: int     # experiment 2's library, trained longer
    zs_held_out_tasks: int
    zs_steps: int
    mbc_steps: int            # steps of each MBC cluster adapter (experiment 2)
    clusters: int
    general_steps: int        # experiment 2: the general-knowledge LoRA that GenKnowSub subtracts
    batch_size: int
    max_length: int
    n_eval: int               # evaluation examples per held-out task (experiment 2)
    n_mixed: int              # evaluation examples per library task (experiments 3 and 4)
    continual_tasks: int
    family_steps: int         # experiment 1: steps per adapter
    family_per_source: int    # experiment 1: training examples per source data set
    family_n_eval: int        # experiment 1: test examples per set
    family_max_length: int    # experiment 1: tokens per training example (math rationales are long)
    math_new_tokens: int

    def train_config(self, steps: int | None = None, max_length: int | None = None) -> TrainConfig:
        return TrainConfig(steps=steps or self.steps, batch_size=self.batch_size,
                           max_length=max_length or self.max_length, holdout=HOLDOUT, seed=0, max_samples=50)


QUICK = Settings(base="tiny", library_tasks=4, held_out_tasks=2, steps=3, zs_library_tasks=4, zs_held_out_tasks=2,
                 zs_steps=3, mbc_steps=3, clusters=2, general_steps=3, batch_size=4,
                 max_length=96, n_eval=6, n_mixed=4, continual_tasks=3, family_steps=2, family_per_source=8,
                 family_n_eval=4, family_max_length=128, math_new_tokens=8)
FULL = Settings(base=None, library_tasks=16, held_out_tasks=8, steps=40, zs_library_tasks=48, zs_held_out_tasks=16,
                zs_steps=120, mbc_steps=240, clusters=8, general_steps=240, batch_size=8,
                max_length=160, n_eval=50, n_mixed=25, continual_tasks=5, family_steps=100, family_per_source=1000,
                family_n_eval=200, family_max_length=320, math_new_tokens=192)


@dataclass
class Context:
    name: str                 # the experiment
    settings: Settings
    quick: bool
    data: Path                # the shared data folder
    work: Path                # trained adapters, libraries, raw evaluation (resumable)
    results: Path             # report, tables and plots
    command: str
    device: str = "auto"      # where the base runs (modulora.compute)
    dtype: str = "auto"
    ray: object = None        # RayOptions: library builds and evaluations run as Ray tasks
    _bases: dict = field(default_factory=dict)  # serving? -> the loaded base

    @property
    def base(self):
        """The base that trains (and fingerprints the libraries)."""
        return self._loaded(serving=False)

    @property
    def eval_base(self):
        """The base that the evaluations generate with, in the precision `modulora eval` and the
        server use (on a CPU with AMX: bf16 weights, which multiply batched prompts several times
        faster than fp32; bench/results/precision.md)."""
        return self._loaded(serving=True)

    def _loaded(self, serving: bool):
        if serving not in self._bases:
            from ..base import load_base

            self._bases[serving] = load_base(self.settings.base, device=self.device, dtype=self.dtype,
                                             serving=serving)
        return self._bases[serving]

    def train_config(self, steps: int | None = None, max_length: int | None = None) -> TrainConfig:
        """The settings' training config, in this run's precision (--dtype)."""
        return dataclasses.replace(self.settings.train_config(steps, max_length), dtype=self.dtype)

    def data_file(self, rel: str) -> Path:
        p = self.data / rel
        if not p.is_file():
            raise DataError(f"{p} not found: --data must be the shared data folder (see its README): "
                            "llm-adapters/, gsm8k/, flan-cot/, sni/, hellaswag/")
        return p

    def sni(self, task: str) -> Path:
        return self.data_file(f"sni/{task}.json")


def make_context(name: str, data: str | None, work: str | None, results: str | None, quick: bool,
                 argv: list[str], device: str = "auto", dtype: str = "auto", ray=None) -> Context:
    """Paths checked before anything runs; quick runs write their report into the work folder."""
    given = data or os.environ.get("MODULORA_DATA")
    if not given or not Path(given).is_dir():
        raise DataError("the experiments need the shared data folder: pass --data DIR (or set MODULORA_DATA); "
                        f"{given or 'none was given'}{' is not a folder' if given else ''}")
    data_dir = Path(given)
    mode = "quick" if quick else "full"
    work_dir = Path(work or Path("runs") / "experiments") / mode
    results_dir = Path(results) if results else (work_dir / "results" / name if quick else
                                                  Path("experiments") / "results" / name)
    work_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    return Context(name=name, settings=QUICK if quick else FULL, quick=quick, data=data_dir, work=work_dir,
                   results=results_dir, command="modulora " + " ".join(argv), device=device, dtype=dtype, ray=ray)


def sni_task_names(ctx: Context, zeroshot: bool = False) -> tuple[list[str], list[str]]:
    """(library tasks, held-out tasks): experiment 2's larger set when `zeroshot`."""
    s = ctx.settings
    if zeroshot:
        return LIBRARY_TASKS[: s.zs_library_tasks], HELD_OUT_TASKS[: s.zs_held_out_tasks]
    return LIBRARY_TASKS[: s.library_tasks], HELD_OUT_TASKS[: s.held_out_tasks]


def sni_library(ctx: Context, progress: bool = True, zeroshot: bool = False) -> tuple[Path, Path]:
    """The private library of SNI experts (one LoRA per library task), built once and shared by
    experiments 3-4 (experiment 2 builds its larger one): (library folder, build folder with
    `adapters/<task>`)."""
    from ..build import build_library
    from ..library import Library

    names, _ = sni_task_names(ctx, zeroshot)
    steps = ctx.settings.zs_steps if zeroshot else ctx.settings.steps
    files = ctx.work / f"sni-tasks-{len(names)}"
    files.mkdir(exist_ok=True)
    for n in names:
        link = files / f"{n}.json"
        if not link.exists():
            link.symlink_to(ctx.sni(n).resolve())
    tag = f"{len(names)}x{steps}"
    build, lib = ctx.work / f"sni-private-{tag}", ctx.work / f"lib-private-{tag}"
    build_library(ctx.base, files, build, Library(lib), mode="private", train=ctx.train_config(steps),
                  adapter=AdapterConfig(), progress=progress, ray=ctx.ray)
    return lib, build


def train_one(ctx: Context, task, out: Path, adapter: AdapterConfig | None = None, steps: int | None = None,
              progress: bool = True, max_length: int | None = None) -> Path:
    """Train (or reuse, when `out` already holds the same training) one adapter on a Task."""
    train_many(ctx, [(task, out, steps)], adapter, progress, max_length=max_length)
    return out


def train_many(ctx: Context, jobs: list[tuple], adapter: AdapterConfig | None = None, progress: bool = True,
               desc: str = "train", max_length: int | None = None) -> None:
    """Train (or reuse) one adapter per (task, out folder, steps): one after another, or side by
    side as Ray tasks when the run has --ray."""
    from ..build import trained
    from ..cluster import worker_base

    full = [(task.name, task, ctx.train_config(steps, max_length), out, _examples_digest(task))
            for task, out, steps in jobs]
    spec = worker_base(ctx.base, ctx.device, ctx.dtype, ctx.ray) if ctx.ray is not None else None
    for _ in trained(ctx.base, full, adapter or AdapterConfig(), progress, ctx.ray, spec, desc, "adapter"):
        pass


def _examples_digest(task) -> str:
    return hashlib.sha256("\n".join(f"{ex.instruction}\0{ex.input}\0{ex.output}" for ex in task.examples)
                          .encode()).hexdigest()


def add(ctx: Context, library: Path, name: str, path: Path) -> None:
    from ..build import add_if_new
    from ..library import Library

    add_if_new(Library(library), name, path, ctx.base.fingerprint)


def environment() -> str:
    """Versions and hardware, for the report."""
    import torch
    import transformers

    from .. import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"modulora {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {sys.version.split()[0]}; {cpu}, {os.cpu_count()} cores, {gpu}; "
            f"torch threads {torch.get_num_threads()}")


def precision(ctx: Context) -> str:
    """How the run trains and evaluates, e.g. 'training cpu fp32 (bf16 autocast), evaluation cpu bf16'."""
    from ..compute import resolve

    train = resolve(ctx.device, ctx.dtype, training=True).describe()
    return f"training {train}, evaluation {resolve(ctx.device, ctx.dtype, serving=True).describe()}"


def write_report(ctx: Context, title: str, body: list[str]) -> Path:
    """`README.md` in the results folder: the command, mode, settings, environment, then the body."""
    s = dataclasses.asdict(ctx.settings)
    lines = [f"# {title}", "",
             f"Command: `{ctx.command}`  ",
             f"Mode: {'quick (tiny random model: checks the pipeline, the numbers mean nothing)' if ctx.quick else 'full'}"
             f"  \nFinished: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
             f"Environment: {environment()}  ",
             f"Precision: {precision(ctx)}  ",
             f"Settings: `{json.dumps(s)}`", "", *body, ""]
    return write_text_atomic(ctx.results / "README.md", "\n".join(lines))


def publish(ctx: Context, src_dir: Path, files: dict[str, str]) -> None:
    """Copy result files (name in src_dir -> name in the report folder) that exist."""
    for name, dst in files.items():
        if (src_dir / name).exists():
            (ctx.results / dst).write_bytes((src_dir / name).read_bytes())


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _difference(res, a: str, b: str) -> tuple[float, float, float]:
    return tuple(round(x, 1) + 0.0 for x in paired_difference(res, a, b))  # + 0.0: no "-0.0"


def gap(res, a: str, b: str) -> str:
    """'a - b: +1.2 points (95% paired bootstrap interval -0.5 to +2.9)', for reading a verdict."""
    d, lo, hi = _difference(res, a, b)
    return f"{a} - {b}: {d:+.1f} points (95% paired bootstrap interval {lo:+.1f} to {hi:+.1f})"


def interval(res, a: str, b: str) -> str:
    """'+1.2 (-0.5 to +2.9)': a - b in points with its 95% paired bootstrap interval, for a table cell."""
    d, lo, hi = _difference(res, a, b)
    return f"{d:+.1f} ({lo:+.1f} to {hi:+.1f})"
