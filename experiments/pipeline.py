"""The product's main job, one command: corpus -> conversion -> alignment -> sparse KD -> one expert
per domain -> merge -> held-out cross-entropy -> Win-and-Tie evaluation -> decode speed -> report.

    python -m experiments.pipeline --config configs/experiments/quickstart.yaml
    python -m experiments.pipeline --config configs/experiments/quickstart.yaml --out runs/other --kd.steps 40
    python -m experiments.pipeline --help          # every option

Every stage writes into its own folder under ``out`` and finishes by writing ``stage.json`` (its
settings, result and time) atomically. A stage whose ``stage.json`` exists is skipped, so a run
that was interrupted resumes at the first unfinished stage (a training stage that left a
``last.ckpt`` resumes from it); a stage whose recorded settings differ from the current ones is
refused, naming the stage and the setting, rather than silently mixing two configurations.

Outputs: ``report.md`` and ``win_tie.png`` (merged, stage-2 and converted students against the
teacher), ``scores.json``, ``heldout.json``, ``decode.json``, each stage's student under
``<stage>/student``, TensorBoard logs under ``tensorboard/`` (``tensorboard --logdir <out>``), and
last ``summary.json`` (every number of the run; sweeps read it). ``--domains '[]'`` stops after KD
(no experts, no merge); ``--eval.students`` picks which students the suite scores; ``--reuse``
copies stages other runs finished with the same settings (``experiments.sweep`` uses both).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from datamodules.corpus import CorpusConfig, build_corpus, read_manifest
from datamodules.eval_suite import SuiteSize
from models import DistilXLSTMConfig, HybridConfig
from models.checkpoint import atomic_file_write

PROJECT = Path(__file__).resolve().parents[1]
DOMAINS = ("math", "code", "stem", "chat")
CURVE_ALPHAS = [round(0.005 * i, 4) for i in range(101)]
# swa_only: the teacher converted with the memory branch off (same window and sinks), the baseline
# that shows what the memory adds; hybrid students only
STUDENT_KEYS = ("swa_only", "converted", "aligned", "kd", "merged")
LABELS = {"merged": "merged", "kd": "stage-2", "aligned": "stage-1", "converted": "converted", "swa_only": "SWA-only"}
# held-out differences the report shows: each stage against the one before it, and the memory's worth
STAGE_PAIRS = (("aligned", "converted"), ("kd", "aligned"), ("merged", "kd"), ("swa_only", "converted"),
               ("kd", "converted"))


@dataclass
class TrainSettings:
    """One training stage: its length and the LightningCLI keys it overrides."""

    steps: int = 20
    """Optimizer steps."""
    batch_size: int = 4
    """Blocks per step."""
    lr: float = 1e-4
    """Peak learning rate."""
    trainable: str | None = None
    """``new`` | ``attention`` | ``all`` (None: the stage config's default)."""
    val_batches: int = 1
    """Validation batches when the stage ends (0: none; the pipeline's held-out stage scores every student)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: none, a killed stage restarts); the stage's
    checkpoints are deleted once its student is saved."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Further LightningCLI keys of the stage, e.g. {"model.init_args.top_k": 32}."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1")
        if self.val_batches < 0 or self.checkpoint_every < 0:
            raise ValueError(f"val_batches={self.val_batches} and checkpoint_every={self.checkpoint_every} must be >= 0")


@dataclass
class MergeSettings:
    """How the domain experts become one student (callbacks.merge_students)."""

    method: str = "mean"
    """``mean`` | ``task_arithmetic`` | ``ties`` (the last two against the stage-2 student)."""
    weights: dict[str, float] | list[float] | None = None
    """One weight per domain (the paper's Eq. 14 lambda_i): by name, ``{math: 0.35, code: 0.35, stem:
    0.20, chat: 0.10}`` (its Llama-3.1-8B-IT merge), or a list in ``domains`` order; None: equal."""
    scale: float = 1.0
    """Task-arithmetic / TIES lambda."""
    density: float = 0.2
    """Share of each task vector TIES keeps."""
    trim: str = "global"
    """TIES trimming over each expert's whole task vector (``global``, as published) or ``per_tensor``."""


@dataclass
class EvalSettings:
    """Scoring on held-out text and on lm-eval tasks."""

    tasks: list[str] = field(default_factory=lambda: ["xdistill-suite"])
    """lm-eval task names (``xdistill-suite``: the embedded offline suite)."""
    include_path: list[str] | None = None
    """Folders of local task YAMLs."""
    limit: int | None = 30
    """Items per task (None: all)."""
    num_fewshot: int | None = None
    """Few-shot examples (None: each task's default)."""
    batch_size: int = 8
    """Requests per forward."""
    heldout_blocks_per_domain: int = 4
    """Held-out blocks (of ``seq_len`` tokens) of every domain for cross-entropy, KL and top-1 agreement."""
    suite: SuiteSize = field(default_factory=SuiteSize)
    """Items per task of the embedded suite, and the needle lengths (give 4x-16x the window)."""
    target: float = 1.0
    """C_alpha that defines alpha*."""
    offline: bool = True
    """Refuse tasks that need the Hugging Face hub at once (false: lm-eval downloads them)."""
    students: list[str] | None = None
    """Students scored on the task list, from ``converted``, ``kd``, ``merged`` (None: every student the
    run has). The final student (``merged``, or ``kd`` when there are no experts) is always scored."""

    def __post_init__(self):
        unknown = sorted(set(self.students or ()) - set(STUDENT_KEYS))
        if unknown:
            raise ValueError(f"eval.students has {unknown}; allowed values: a list from {', '.join(STUDENT_KEYS)}")


@dataclass
class DecodeSettings:
    """Decode speed and state memory of the merged student against the teacher at a long prompt."""

    prompt_length: int = 2048
    """Prompt tokens before decoding (0 skips the measurement)."""
    new_tokens: int = 16
    """Timed decoding steps (the median is reported)."""
    warmup: int = 2
    """Untimed steps first."""


# ---- stages: skip when done, refuse when the settings changed -------------------------------------

def _plain(value):
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _write_json(path: Path, payload) -> None:
    atomic_file_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str)))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # finished stages are never written again, so sharing their files is safe
    except OSError:
        shutil.copy2(src, dst)


def _moved_paths(value, old: Path, new: Path):
    """``value`` with every string that is a path inside the folder ``old`` (absolute) pointing to the same
    place inside ``new``."""
    if isinstance(value, dict):
        return {k: _moved_paths(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved_paths(v, old, new) for v in value]
    if isinstance(value, str) and os.sep in value:
        try:
            return str(new / Path(value).resolve().relative_to(old))
        except (ValueError, OSError):
            pass
    return value


class StageRunner:
    """Runs named stages in order inside ``out``; each records ``<out>/<stage>/stage.json`` when done.

    ``reuse``: other run folders; a stage finished there with the same settings is copied (files
    hard-linked where possible, paths in its result moved to ``out``) instead of being run again, so
    sweep points that differ only in late stages share their early ones.
    """

    def __init__(self, out: Path, total: int, reuse: list[Path] | None = None):
        self.out, self.total, self.index = Path(out), total, 0
        self.reuse = [Path(r).resolve() for r in reuse or [] if Path(r).resolve() != self.out.resolve()]
        self.timings: dict[str, float] = {}

    def _copy_finished(self, name: str, settings: dict) -> dict | None:
        for other in self.reuse:
            marker = other / name / "stage.json"
            if not marker.is_file():
                continue
            record = json.loads(marker.read_text())
            if record["settings"] != settings:
                continue
            folder = self.out / name
            shutil.rmtree(folder, ignore_errors=True)  # a half-done attempt here is superseded
            shutil.copytree(other / name, folder, copy_function=_link_or_copy,
                            ignore=shutil.ignore_patterns("stage.json", "checkpoints"))
            logs = other / "tensorboard" / name
            if logs.is_dir() and not (self.out / "tensorboard" / name).exists():
                shutil.copytree(logs, self.out / "tensorboard" / name, copy_function=_link_or_copy)
            record["result"] = _moved_paths(record["result"], other, self.out)
            record["reused_from"] = str(other / name)
            _write_json(folder / "stage.json", record)
            return record
        return None

    def __call__(self, name: str, settings: dict, fn):
        self.index += 1
        folder = self.out / name
        marker = folder / "stage.json"
        settings = _plain(settings)
        if marker.is_file():
            record = json.loads(marker.read_text())
            if record["settings"] != settings:
                changed = sorted(k for k in set(settings) | set(record["settings"])
                                 if settings.get(k) != record["settings"].get(k))
                raise ValueError(f"stage {name!r} in {self.out} was finished with other settings (changed: "
                                 f"{', '.join(changed)}); use another --out, or delete {folder} to redo it")
            print(f"[{self.index}/{self.total}] {name}: finished earlier ({record['seconds']:.0f} s), skipped", flush=True)
            self.timings[name] = record["seconds"]
            return record["result"]
        record = self._copy_finished(name, settings)
        if record is not None:
            print(f"[{self.index}/{self.total}] {name}: same settings finished in {record['reused_from']}, copied",
                  flush=True)
            self.timings[name] = record["seconds"]
            return record["result"]
        print(f"[{self.index}/{self.total}] {name} ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = _plain(fn(folder))
        seconds = time.perf_counter() - started
        _write_json(marker, {"settings": settings, "result": result, "seconds": seconds})
        self.timings[name] = seconds
        print(f"[{self.index}/{self.total}] {name}: done in {seconds:.0f} s", flush=True)
        return result


# ---- the stages ---------------------------------------------------------------------------------

def die_with_parent() -> None:
    """``preexec_fn`` of child processes: Linux sends the child SIGTERM when its parent dies, even by
    SIGKILL (a preempted job), so no orphan keeps writing into a run that a restart resumes."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass  # not Linux: the job's scheduler kills the process group instead


def _device() -> torch.device:
    """Where scoring runs: the first GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def data_sources(corpus: Path, domains: tuple[str, ...]) -> list[dict]:
    """DataSource dicts for the corpus files of ``domains`` (equal weights)."""
    manifest = read_manifest(corpus)
    return [{"path": str(corpus / manifest["domains"][d]["file"]), "name": d,
             "format": manifest["domains"][d]["format"], "weight": 1.0} for d in domains]


def _project_path(path: str) -> str:
    """Config paths are relative to the project (the pipeline runs from any folder)."""
    return str(path if Path(path).is_absolute() else PROJECT / path)


def stage_arguments(stage: str, folder: Path, *, teacher: str, teacher_dtype: str, sources: list[dict], seq_len: int,
                    val_fraction: float, seed: int, settings: TrainSettings, tensorboard: Path, trainer: list[str],
                    mixture_blocks: int | None = None, student_ckpt: str | None = None,
                    extra: tuple[str, ...] = ()) -> list[str]:
    """The ``experiments.run fit`` arguments of one training stage (configs/stages/<stage>.yaml plus
    the pipeline's settings and the stage's overrides)."""
    checkpoints = folder / "checkpoints"
    args = ["fit", "--config", _project_path(f"configs/stages/{stage}.yaml")]
    for path in trainer:
        args += ["--config", _project_path(path)]
    args += ["--seed_everything", str(seed), "--model.init_args.teacher", teacher,
             "--model.init_args.teacher_dtype", teacher_dtype, "--model.init_args.lr", str(settings.lr),
             "--data.sources", json.dumps(sources), "--data.seq_len", str(seq_len),
             "--data.batch_size", str(settings.batch_size), "--data.seed", str(seed),
             "--data.val_fraction", str(val_fraction),
             # validate once, after the last step, however many epochs the steps span
             "--trainer.max_steps", str(settings.steps), "--trainer.val_check_interval", str(settings.steps),
             "--trainer.check_val_every_n_epoch", "null",
             "--trainer.limit_val_batches", str(settings.val_batches), "--trainer.num_sanity_val_steps", "0",
             "--trainer.log_every_n_steps", "1", "--trainer.logger.init_args.save_dir", str(tensorboard),
             "--trainer.logger.init_args.name", folder.name, "--trainer.logger.init_args.version", "0",
             "--checkpoint.dirpath", str(checkpoints), "--checkpoint.save_top_k", "0",
             "--checkpoint.save_last", str(settings.checkpoint_every > 0).lower(),
             "--student_export.dirpath", str(folder / "student"), *extra]
    if mixture_blocks:
        args += ["--data.mixture_blocks", str(mixture_blocks)]
    if settings.checkpoint_every:
        args += ["--checkpoint.every_n_train_steps", str(settings.checkpoint_every)]
    if student_ckpt:
        args += ["--model.init_args.student_ckpt", student_ckpt]
    if settings.trainable:
        args += ["--model.init_args.trainable", settings.trainable]
    for key, value in settings.overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def check_stage_arguments(name: str, args: list[str]) -> None:
    """Parse and check a training stage's command without running it (LightningCLI with run=False:
    the parser, ``check_stage_config`` and the classes' own checks; no model is loaded), so a bad
    key or value fails before the pipeline's first stage rather than hours into it."""
    from experiments.run import check_planned_stage

    try:
        check_planned_stage([a for a in args if a != "fit"])
    except SystemExit as err:
        raise ValueError(f"the {name} stage's settings do not parse (the parser's message is above); fix the "
                         f"pipeline's {name} settings or overrides") from err
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise type(err)(f"the {name} stage's settings are refused: {err}") from err


def train_stage(stage: str, folder: Path, *, stage_process: bool, **kwargs) -> dict:
    """One LightningCLI fit of ``configs/stages/<stage>.yaml`` with the ``trainer`` configs (the
    arguments of ``stage_arguments``), in this process or (``stage_process``) as its own ``python -m
    experiments.run`` process; resumes from the stage's last.ckpt if one was saved."""
    import subprocess
    import sys

    args = stage_arguments(stage, folder, **kwargs)
    checkpoints = folder / "checkpoints"
    if (checkpoints / "last.ckpt").is_file():
        args += ["--ckpt_path", str(checkpoints / "last.ckpt")]
    if stage_process:
        # a multi-process strategy's launcher re-runs the command it finds: let that be this stage
        subprocess.run([sys.executable, "-m", "experiments.run", *args], check=True, preexec_fn=die_with_parent)
        metrics = {}
    else:
        from experiments.run import main

        cli = main(args)
        metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    if not (folder / "student" / "model.safetensors").is_file():
        raise RuntimeError(f"stage {folder.name} ended without saving its student to {folder / 'student'}")
    shutil.rmtree(checkpoints, ignore_errors=True)  # the saved student is the stage's output
    return {"student": str(folder / "student"), "metrics": metrics}


def convert_stage(folder: Path, teacher: str, hybrid: HybridConfig, dtype: str, family: str = "hybrid",
                  distil_xlstm: DistilXLSTMConfig | None = None, seed: int = 0) -> dict:
    """The initial student: the teacher converted to hybrid layers, or a Distil-xLSTM student with
    fresh xLSTM blocks (seeded) around the teacher's embedding and head."""
    from models import convert_to_hybrid, distil_xlstm_from_teacher, load_teacher, load_tokenizer, save_student

    model = load_teacher(teacher, dtype=getattr(torch, dtype))
    if family == "distil_xlstm":
        torch.manual_seed(seed)
        student = distil_xlstm_from_teacher(model, distil_xlstm).eval()
    else:
        student = convert_to_hybrid(model, hybrid).eval()
    save_student(student, folder / "student", tokenizer=load_tokenizer(teacher))
    return {"student": str(folder / "student"), "describe": student.describe(),
            "new_parameters": sum(p.numel() for _, p in student.new_parameters())}


def blocks_read(size: int, seed: int, batch_size: int, steps: int) -> list[int]:
    """Indices of the training blocks a single-process stage of ``steps`` batches reads, in order
    (the loader's seeded per-epoch permutation, whole batches), each block once."""
    from datamodules.loader import EpochShuffleSampler

    per_epoch = size // batch_size
    if per_epoch == 0:
        raise ValueError(f"{size} training blocks are fewer than batch_size={batch_size}")
    read, epoch = [], 0
    while len(read) < steps * batch_size:
        sampler = EpochShuffleSampler(size, seed)
        sampler.set_epoch(epoch)
        read += sampler.order()[:per_epoch * batch_size]
        epoch += 1
    return list(dict.fromkeys(read[:steps * batch_size]))


def topk_stage(folder: Path, *, teacher: str, teacher_dtype: str, sources: list[dict], seq_len: int,
               val_fraction: float, seed: int, settings: TrainSettings, k: int,
               mixture_blocks: int | None = None) -> dict:
    """The teacher's top-k over exactly the blocks a training stage will read, computed once and
    kept under $XDISTILL_CACHE/topk (keyed by teacher weights, blocks and k), so that reruns, sweep
    points and every stage on the same blocks train without running the teacher again."""
    from datamodules import DataSource, TextDataModule
    from datamodules.topk_cache import MANIFEST, data_fingerprint, write_topk_cache
    from models import load_teacher
    from models.teacher import cache_dir, teacher_fingerprint

    data = TextDataModule(tokenizer=teacher, sources=[DataSource(**s) for s in sources], seq_len=seq_len,
                          batch_size=settings.batch_size, seed=seed, val_fraction=val_fraction,
                          mixture_blocks=mixture_blocks)
    data.setup("fit")
    blocks = data.train_set.tensors
    order = torch.tensor(blocks_read(len(data.train_set), seed, settings.batch_size, settings.steps))
    ids, labels = blocks["input_ids"][order], blocks["labels"][order]
    model = load_teacher(teacher, dtype=getattr(torch, teacher_dtype), device=_device())
    k = min(k, model.config.vocab_size)  # the top-256 of a smaller vocabulary is all of it
    path = cache_dir() / "topk" / f"{teacher_fingerprint(model)[:16]}-{data_fingerprint(ids)}-k{k}"
    started = time.perf_counter()
    if not (path / MANIFEST).is_file():
        write_topk_cache(model, data.tokenizer, ids, labels, k, path)
    return {"path": str(path), "blocks": len(order), "tokens": int(ids.numel()),
            "seconds_teacher": time.perf_counter() - started}


def expert_weights(weights, domains: list[str]) -> list[float] | None:
    """``merge.weights`` as one weight per expert, in ``domains`` order (None: equal weights)."""
    if weights is None or not domains:
        return None
    if isinstance(weights, dict):
        missing, extra = sorted(set(domains) - set(weights)), sorted(set(weights) - set(domains))
        if missing or extra:
            raise ValueError(f"merge.weights names {sorted(weights)} but domains={domains} (missing: {missing}, "
                             f"not a domain: {extra}); give one weight per domain")
        weights = [weights[d] for d in domains]
    weights = [float(w) for w in weights]
    if len(weights) != len(domains):
        raise ValueError(f"merge.weights has {len(weights)} values for {len(domains)} domains {domains}; give one "
                         "weight per domain, e.g. {math: 0.35, code: 0.35, stem: 0.2, chat: 0.1}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"merge.weights={weights} must be >= 0 with a positive sum (the paper's lambda_i >= 0)")
    return weights


@torch.no_grad()
def heldout_stage(folder: Path, teacher: str, dtype: str, students: dict[str, str], sources: list[dict], seq_len: int,
                  val_fraction: float, seed: int, blocks_per_domain: int, bootstrap: int = 2000,
                  experts: dict[str, str] | None = None) -> dict:
    """Cross-entropy of the teacher and each student on the same held-out blocks: ``blocks_per_domain``
    blocks of every domain (documents no stage trains on, spread through each domain's held-out
    text), with KL(teacher || student) and top-1 agreement, per domain and overall (every domain
    weighted by its tokens, equal here), each with a 90 % bootstrap interval over blocks and, for
    every student, its CE minus the converted student's on the same blocks (paired). ``pairs`` in the
    result: each stage against the one before it (stage 1 - converted, stage 2 - stage 1, merged -
    stage 2, SWA-only - converted), and with ``experts`` ({domain: student}) each expert against the
    merged student on the expert's own domain, all paired."""
    from datamodules import DataSource, TextDataModule
    from experiments.heldout import block_scores, select_blocks, summarise
    from models import load_student, load_teacher

    data = TextDataModule(tokenizer=teacher, sources=[DataSource(**s) for s in sources], seq_len=seq_len, batch_size=1,
                          seed=seed, val_fraction=val_fraction)
    data.setup("validate")
    blocks = select_blocks(data.validation_blocks_by_source(), blocks_per_domain)
    device = _device()
    teacher_model = load_teacher(teacher, dtype=getattr(torch, dtype), device=device)
    models = {name: load_student(path).eval().to(device) for name, path in students.items()}
    blocks = {d: ids.to(device) for d, ids in blocks.items()}
    per_block = block_scores(teacher_model, models, blocks)
    pairs = [(a, b) for a, b in STAGE_PAIRS if a in models and b in models]
    summary = summarise(per_block, "converted" if "converted" in models else None, bootstrap, seed, pairs)
    result = {}
    for name in models:
        overall = summary[name]["all"]
        result[name] = {**{k: v for k, v in overall.items()}, "teacher_ce": summary["teacher"]["all"]["student_ce"],
                        "teacher_ce_90": summary["teacher"]["all"]["student_ce_90"],
                        "domains": {d: e for d, e in summary[name].items() if d != "all"}}
    result["teacher"] = {"student_ce": summary["teacher"]["all"]["student_ce"],
                         "student_ce_90": summary["teacher"]["all"]["student_ce_90"],
                         "domains": {d: e for d, e in summary["teacher"].items() if d != "all"}}
    result["pairs"] = summary.get("pairs", {})
    # every model's per-block sums: runs on the same blocks (sweep points) compare paired, after the fact
    result["per_block"] = per_block
    result["experts"] = {}
    for domain, path in (experts or {}).items():
        if "merged" not in models or domain not in blocks:
            continue
        expert = load_student(path).eval().to(device)
        own = block_scores(teacher_model, {"expert": expert}, {domain: blocks[domain]})
        own["merged"] = {domain: per_block["merged"][domain]}  # the same blocks, scored above
        paired = summarise(own, None, bootstrap, seed, [("expert", "merged")])
        result["experts"][domain] = {"expert": paired["expert"][domain], "merged": paired["merged"][domain],
                                     "expert - merged": paired["pairs"]["expert - merged"][domain]}
        del expert
    tokens_per_domain = {d: int(sum(row["n"] for row in per_block["teacher"][d])) for d in blocks}
    result["tokens"] = sum(tokens_per_domain.values())
    result["tokens_per_domain"] = tokens_per_domain
    result["blocks_per_domain"] = blocks_per_domain
    _write_json(folder / "heldout.json", result)
    return result


def eval_stage(folder: Path, model_path: str | None, teacher: str, settings: EvalSettings, dtype: str) -> dict:
    """One model's scores and per-item scores on the task list ({"scores", "items"}; ``model_path``
    None: the teacher). Cached across runs by weights: the teacher and the fresh conversions are
    scored once per config, and a rerun into another folder reuses every score."""
    from callbacks.eval import cached_evaluation, cached_teacher_evaluation, weights_fingerprint
    from models import load_student, load_teacher, load_tokenizer

    if settings.offline:
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    tokenizer = load_tokenizer(teacher)
    args = (settings.tasks, settings.include_path, settings.num_fewshot, settings.limit, settings.batch_size)
    if model_path is None:
        evaluation = cached_teacher_evaluation(load_teacher(teacher, dtype=getattr(torch, dtype), device=_device()),
                                               tokenizer, *args, suite=settings.suite)
    else:
        evaluation = cached_evaluation(load_student(model_path).eval().to(_device()), tokenizer, *args,
                                       suite=settings.suite, fingerprint=weights_fingerprint(model_path), role="student")
    _write_json(folder / "scores.json", evaluation)
    return evaluation


def decode_stage(folder: Path, teacher: str, student: str, settings: DecodeSettings) -> dict:
    """The decode benchmark (``experiments.bench``) at one prompt length, batch 1; its JSON,
    table and figure go to ``folder``."""
    from experiments.bench import Bench

    payload = Bench(teacher=teacher, student=student, prompt_lengths=[settings.prompt_length], batch_sizes=[1],
                    out_dir=str(folder)).decode(steps=settings.new_tokens, warmup=settings.warmup)
    rows = {r["model"]: r for r in payload["rows"]}
    summary = payload["summary"][0]
    return {"prompt": settings.prompt_length, "batch": 1, "teacher_ms_per_token": summary["teacher_ms"],
            "student_ms_per_token": summary["student_ms"], "decode_speedup": summary["speedup"],
            "shared_floor_ms_per_token": summary["floor_ms"],
            "teacher_kv_cache_bytes": rows["teacher"]["state_bytes"],
            "student_state_bytes": rows["student"]["state_bytes"],
            "teacher_prefill_s": rows["teacher"]["prefill_s"], "student_prefill_s": rows["student"]["prefill_s"]}


# ---- the report -------------------------------------------------------------------------------

def _span(entry: dict, key: str, fmt: str = ".3f") -> str:
    lo, hi = entry[f"{key}_90"]
    return f"{entry[key]:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def heldout_tables(heldout: dict, keys: list[str]) -> str:
    """Markdown: every model's held-out CE, KL and top-1 agreement overall (90 % intervals over
    blocks; CE minus the converted student's, paired), then CE per domain."""
    lines = ["| model | CE | CE − converted (paired) | KL(teacher‖student) | top-1 agreement |",
             "|---|---:|---:|---:|---:|"]
    for key in keys:
        h = heldout[key]
        diff = _span(h, "ce_minus_baseline", "+.3f") if "ce_minus_baseline" in h else "baseline" if key == "converted" else ""
        lines.append(f"| {LABELS[key]} | {_span(h, 'student_ce')} | {diff} | {_span(h, 'kl_teacher_student')} | "
                     f"{_span(h, 'top1_agreement')} |")
    lines.append(f"| teacher | {_span(heldout['teacher'], 'student_ce')} | | | |")
    domains = list(heldout["teacher"]["domains"])
    lines += ["", "| CE per domain | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for key in keys:
        lines.append(f"| {LABELS[key]} | " + " | ".join(_span(heldout[key]["domains"][d], "student_ce") for d in domains) + " |")
    lines.append("| teacher | " + " | ".join(_span(heldout["teacher"]["domains"][d], "student_ce") for d in domains) + " |")
    return "\n".join(lines)


def pairs_table(heldout: dict) -> str:
    """Markdown: each stage against the one before it on held-out text (paired differences, 90 %
    intervals over blocks; negative = the first is closer to the text / the teacher), then each
    expert against the merged student on the expert's own domain."""
    lines = []
    names = {**LABELS, "expert": "expert"}
    pairs = heldout.get("pairs", {})
    if pairs:
        lines += ["| difference | CE | KL(teacher‖student) |", "|---|---:|---:|"]
        for pair, entry in pairs.items():
            a, b = pair.split(" - ")
            overall = entry["all"]
            lines.append(f"| {names[a]} − {names[b]} | {_span(overall, 'student_ce', '+.3f')} | "
                         f"{_span(overall, 'kl_teacher_student', '+.3f')} |")
    experts = heldout.get("experts", {})
    if experts:
        lines += ["", "| domain | expert CE | merged CE | expert − merged CE | expert − merged KL |",
                  "|---|---:|---:|---:|---:|"]
        for domain, entry in experts.items():
            diff = entry["expert - merged"]
            lines.append(f"| {domain} | {_span(entry['expert'], 'student_ce')} | {_span(entry['merged'], 'student_ce')} | "
                         f"{_span(diff, 'student_ce', '+.3f')} | {_span(diff, 'kl_teacher_student', '+.3f')} |")
    return "\n".join(lines)


def needle_table(scores: dict[str, dict], items: dict[str, dict], keys: list[str]) -> str:
    """Markdown: needle retrieval accuracy by context length (items correct / items)."""
    from datamodules.eval_suite import NEEDLE_PREFIX

    tasks = sorted((t for t in scores["teacher"] if t.startswith(NEEDLE_PREFIX)), key=lambda t: int(t.rsplit("_", 1)[1]))
    if not tasks:
        return ""
    lines = ["| model | " + " | ".join(f"{t.rsplit('_', 1)[1]} tokens" for t in tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for key in ["teacher", *keys]:
        name = "teacher" if key == "teacher" else LABELS[key]
        cells = [f"{scores[key][t]:.2f} ({int(round(sum(items[key][t])))}/{len(items[key][t])})" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_pipeline_report(out: Path, scores: dict[str, dict], heldout: dict, decode: dict | None,
                          timings: dict[str, float], target: float, settings: dict, items: dict[str, dict]) -> str:
    """report.md, win_tie.png, win_tie.csv, scores.json and TensorBoard scalars and figure; returns the
    Markdown (also printed). ``scores`` / ``items``: the teacher's and those of the scored students
    (``merged``, ``kd``, ``converted``, ``swa_only``; the first present of the first three is the
    final student), per task and per item."""
    from callbacks.eval import comparison_table, preset_table, write_report

    teacher = scores["teacher"]
    keys = [k for k in STUDENT_KEYS[::-1] if k in scores]
    final_key = keys[0]
    final = LABELS[final_key]
    labelled = {LABELS[k]: scores[k] for k in keys}
    report = write_report(out, labelled[final], teacher, CURVE_ALPHAS, target, relative=False, label=final,
                          others={k: v for k, v in labelled.items() if k != final},
                          items={LABELS[k]: items[k] for k in keys}, teacher_items=items["teacher"])
    comparisons = report["comparisons"]
    heldout_keys = [k for k in STUDENT_KEYS[::-1] if k in heldout]
    parts = []
    h = heldout[final_key]
    if "ce_minus_baseline" in h:
        lo, hi = h["ce_minus_baseline_90"]
        verdict = "lowered" if hi < 0 else "raised" if lo > 0 else "did not measurably change"
        parts.append(f"Training {verdict} held-out CE against the converted student: {h['ce_minus_baseline']:+.3f} "
                     f"[{lo:+.3f}, {hi:+.3f}] (90 % interval over blocks; teacher {heldout['teacher']['student_ce']:.3f}).")
    if "swa_only" in heldout and "converted" in heldout:
        m = heldout["swa_only"]
        parts.append(f"SWA-only conversion (no memory) CE {_span(m, 'student_ce')} against the converted hybrid's "
                     f"{_span(heldout['converted'], 'student_ce')}.")
    tied = [t for t, row in comparisons[final]["tasks"].items() if row["low"] <= 0 <= row["high"]]
    parts.append(f"On the suite the {final} student's gap to the teacher has a 95 % interval that includes 0 on "
                 f"{len(tied)} of {len(comparisons[final]['tasks'])} tasks.")
    excluded = comparisons[final]["excluded"]
    if excluded:
        parts.append(f"Left out of Win-and-Tie because the teacher does not pass them (chance + margin): {', '.join(excluded)}.")
    decode_md = ""
    if decode:
        decode_md = ("| prompt | teacher ms/token | student ms/token | speed-up | teacher KV cache | student state | "
                     "teacher prefill | student prefill |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
                     f"| {decode['prompt']} | {decode['teacher_ms_per_token']:.1f} | {decode['student_ms_per_token']:.1f} | "
                     f"{decode['decode_speedup']:.2f}x | {decode['teacher_kv_cache_bytes'] / 2**20:.1f} MB | "
                     f"{decode['student_state_bytes'] / 2**20:.1f} MB | {decode['teacher_prefill_s']:.2f} s | "
                     f"{decode['student_prefill_s']:.2f} s |")
    total = sum(timings.values())
    stage_times = " · ".join(f"{name} {sec:.0f} s" for name, sec in timings.items())
    needles = needle_table(scores, items, keys)
    md = (f"# xdistill pipeline report\n\nRun folder `{out}`; teacher `{settings['teacher']}`; student "
          f"{settings['student']}; machine {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}.\n\n"
          f"## Held-out text\n\n{heldout['blocks_per_domain']} blocks of every domain ({heldout['tokens']} scored "
          f"tokens; documents no stage trained on); [90 % bootstrap interval over blocks].\n\n"
          f"{heldout_tables(heldout, heldout_keys)}\n\n"
          + (f"Stage by stage (paired on the same blocks; negative: the first is better):\n\n{pairs_table(heldout)}\n\n"
             if heldout.get("pairs") or heldout.get("experts") else "")
          + f"## Tasks\n\nScore (gap to the teacher [95 % paired bootstrap interval over items], teacher recovery = "
          f"student / teacher).\n\n{comparison_table(comparisons, teacher)}\n\n"
          f"Win-and-Tie over the tasks the teacher passes, alpha* [90 % interval]: `strict` = absolute tolerance, "
          f"every task (C_alpha >= 1); `paper` = the seed paper's, relative tolerance A_S >= (1 - alpha) A_T, "
          f"C_alpha >= 0.5.\n\n{preset_table(comparisons)}\n\n"
          + (f"## Retrieval beyond the window\n\nA 5-digit number planted at least half the context before the "
             f"question (greedy decoding must give it exactly; chance 0).\n\n{needles}\n\n" if needles else "")
          + " ".join(parts) + "\n\n![Win-and-Tie](win_tie.png)\n\n"
          + (f"## Decoding at a long prompt\n\n{decode_md}\n\n" if decode else "")
          + f"## Time\n\n{total:.0f} s in all: {stage_times}\n")
    atomic_file_write(out / "report.md", lambda tmp: tmp.write_text(md))
    _tensorboard(out / "tensorboard" / "report", keys, scores, heldout, comparisons, report["figure"])
    return md


def _tensorboard(folder: Path, keys: list[str], scores: dict, heldout: dict, comparisons: dict, figure) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for key in keys:
            name = LABELS[key]
            c = comparisons[name]
            for preset, result in c["presets"].items():
                star = result["alpha_star"]
                for part in ("value", "low", "high"):
                    writer.add_scalar(f"pipeline/{name}/{preset}/alpha_star_{part}", star[part])
            for metric in ("student_ce", "kl_teacher_student", "top1_agreement"):
                h = heldout[key]
                writer.add_scalar(f"pipeline/{name}/heldout/{metric}", h[metric])
                writer.add_scalar(f"pipeline/{name}/heldout/{metric}_low", h[f"{metric}_90"][0])
                writer.add_scalar(f"pipeline/{name}/heldout/{metric}_high", h[f"{metric}_90"][1])
            for domain, entry in heldout[key]["domains"].items():
                writer.add_scalar(f"pipeline/{name}/heldout_ce/{domain}", entry["student_ce"])
            for task, row in c["tasks"].items():
                writer.add_scalar(f"pipeline/{name}/{task}", row["student"])
                writer.add_scalar(f"pipeline/{name}/gap/{task}", row["gap"])
                writer.add_scalar(f"pipeline/{name}/gap_low/{task}", row["low"])
                writer.add_scalar(f"pipeline/{name}/gap_high/{task}", row["high"])
        for task, value in scores["teacher"].items():
            writer.add_scalar(f"pipeline/teacher/{task}", value)
        writer.add_figure("pipeline/win_tie", figure)
    finally:
        writer.close()


# ---- the command --------------------------------------------------------------------------------

def run_pipeline(out: str = "runs/quickstart", teacher: str = "smollm2-135m-instruct", teacher_dtype: str = "float32",
                 hybrid: HybridConfig = HybridConfig(), student_family: str = "hybrid",
                 distil_xlstm: DistilXLSTMConfig = DistilXLSTMConfig(), corpus: CorpusConfig = CorpusConfig(),
                 corpus_dir: str | None = None, extra_sources: list[dict] | None = None,
                 expert_sources: dict[str, list[dict]] | None = None, mixture_blocks: int | None = None,
                 seq_len: int = 512, val_fraction: float = 0.05, seed: int = 0,
                 align: TrainSettings = TrainSettings(steps=20, lr=1e-3, trainable="new"),
                 kd: TrainSettings = TrainSettings(steps=10, lr=1e-4),
                 expert: TrainSettings = TrainSettings(steps=3, lr=5e-5),
                 domains: list[str] = list(DOMAINS), merge: MergeSettings = MergeSettings(),
                 eval: EvalSettings = EvalSettings(), decode: DecodeSettings = DecodeSettings(),
                 trainer: list[str] = ["configs/trainer/cpu.yaml"], stage_process: bool = False,
                 threads: int | None = None, reuse: list[str] | None = None, topk_cache: int | None = 256) -> dict:
    """Run (or resume) the whole pipeline in ``out``; returns the report's numbers.

    Args:
        out: run folder (stages inside it are skipped once finished).
        teacher: hub id, local folder, or the embedded ``smollm2-135m-instruct``.
        teacher_dtype: dtype the teacher runs in everywhere (float32, bfloat16, float16).
        hybrid: how attention layers become hybrid layers (student_family ``hybrid``).
        student_family: ``hybrid`` (the teacher with hybrid layers: convert, align, KD, ...) or
            ``distil_xlstm`` (a pure xLSTM student: build, KD with the Δ schedule and the Frobenius
            term, ...; there are no attention layers to align, so the align stage is skipped).
        distil_xlstm: the Distil-xLSTM student's configuration (student_family ``distil_xlstm``).
        corpus: the offline corpus (built once, cached under $XDISTILL_CACHE/corpus).
        corpus_dir: where to build the corpus instead of the cache.
        extra_sources: your own corpora (DataSource fields: path, format, weight, ...) added to the
            alignment and KD mixture.
        expert_sources: your own corpora per domain, added to that expert's data.
        mixture_blocks: training blocks per epoch of alignment and KD, drawn from the sources by
            weight (equal per domain; short domains repeat); None: every block once, so the domains
            weigh by their size.
        seq_len: tokens per training block.
        val_fraction: share of each domain's documents held out (never trained on; scored by ``heldout``).
        seed: seed of data order, splits and initialisation.
        align: stage 1 settings (all domains; hybrid students only).
        kd: stage 2 settings (all domains).
        expert: stage 3 settings (one run per domain, on that domain's data).
        domains: expert domains (from math, code, stem, chat); empty: no experts and no merge, the
            stage-2 student is the final one.
        merge: how experts are merged.
        eval: held-out and lm-eval settings.
        decode: decode measurement settings.
        trainer: trainer YAMLs of the training stages (configs/trainer/gpu.yaml on one GPU).
        stage_process: run each training stage as its own process (needed by multi-GPU strategies,
            whose launcher starts one process per device with the stage's command).
        threads: torch CPU threads (None: torch's default).
        reuse: other run folders whose finished stages are copied here when their settings are the
            same as this run's (sweep points share their common early stages this way).
        topk_cache: k of the teacher's top-k that the KD and expert stages read from a cache, computed
            once over exactly the blocks each stage trains on and kept under $XDISTILL_CACHE/topk
            (reruns and sweep points on the same blocks never run the teacher again; the stage's
            ``top_k`` may be smaller); None: the teacher runs online in every step (needed for dense KL).
    """
    if not isinstance(getattr(torch, teacher_dtype, None), torch.dtype):
        raise ValueError(f"teacher_dtype={teacher_dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    if student_family not in ("hybrid", "distil_xlstm"):
        raise ValueError(f"student_family={student_family!r} is not supported; allowed values: hybrid, distil_xlstm")
    distil = student_family == "distil_xlstm"
    from datamodules import DataSource

    for source in [*(extra_sources or []), *(s for group in (expert_sources or {}).values() for s in group)]:
        DataSource(**source)  # a bad source fails here, before any work, with DataSource's message
    unknown = sorted(set(domains) - set(DOMAINS))
    if unknown or len(set(domains)) != len(domains):
        raise ValueError(f"domains={domains} is invalid; allowed values: a list of distinct domains from "
                         f"{', '.join(DOMAINS)} (empty: no experts)")
    unknown = sorted(set(expert_sources or {}) - set(domains))
    if unknown:
        raise ValueError(f"expert_sources has domains {unknown} that are not in domains={domains}")
    merge_weights = expert_weights(merge.weights, domains)
    final = "merged" if domains else "kd"
    if eval.students is not None and final not in eval.students:
        print(f"eval.students={eval.students} lacks the final student {final!r}; it is scored as well", flush=True)
    if "merged" in (eval.students or ()) and not domains:
        raise ValueError("eval.students names 'merged' but domains is empty, so there is no merged student; "
                         "drop 'merged' or add domains")
    available = [k for k in STUDENT_KEYS if (k != "merged" or domains) and (k not in ("swa_only", "aligned") or not distil)]
    scored = [k for k in available if eval.students is None or k in eval.students or k == final]
    if topk_cache is not None and topk_cache < 1:
        raise ValueError(f"topk_cache={topk_cache} is invalid; allowed values: an integer >= 1 (the paper's 256), "
                         "or null for the teacher online")
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(out)
    # every training stage's command is checked now: the corpus does not exist yet (no sources) and
    # neither do the students (the conversion's settings stand in for them)
    planned = dict(teacher=teacher, teacher_dtype=teacher_dtype, sources=[], seq_len=seq_len, val_fraction=val_fraction,
                   seed=seed, tensorboard=run_dir / "tensorboard", trainer=trainer, mixture_blocks=mixture_blocks)
    student_args = (["--model.init_args.student_family", "distil_xlstm", "--model.init_args.distil_xlstm",
                     json.dumps(distil_xlstm.to_dict())] if distil
                    else ["--model.init_args.hybrid", json.dumps(hybrid.to_dict())])
    for name, settings_, extra in (("align", align, ()), ("kd", kd, ()),
                                   ("expert", expert, ("--model.init_args.domain", domains[0] if domains else ""))):
        if (name == "align" and distil) or (name == "expert" and not domains):
            continue
        args = stage_arguments(name, run_dir / name, settings=settings_, extra=extra,
                               student_ckpt=str(run_dir / "kd" / "student") if name == "expert" else None, **planned)
        check_stage_arguments(name, args + student_args)

    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {"teacher": teacher, "teacher_dtype": teacher_dtype, "hybrid": hybrid.to_dict(), "corpus": asdict(corpus),
                "extra_sources": extra_sources, "mixture_blocks": mixture_blocks, "seq_len": seq_len,
                "val_fraction": val_fraction, "seed": seed, "trainer": trainer, "topk_cache": topk_cache}
    if distil:  # (hybrid runs keep their settings as before, so finished stages stay valid)
        settings.update(student_family=student_family, distil_xlstm=distil_xlstm.to_dict())
    _write_json(run_dir / "pipeline.json", {**settings, "align": asdict(align), "kd": asdict(kd), "expert": asdict(expert),
                                            "domains": domains, "merge": asdict(merge), "eval": asdict(eval),
                                            "decode": asdict(decode)})
    topk_common = dict(teacher=teacher, teacher_dtype=teacher_dtype, seq_len=seq_len, val_fraction=val_fraction,
                       seed=seed, k=topk_cache)

    def cached_topk(name: str, sources_: list[dict], settings_: TrainSettings, blocks: int | None) -> tuple[str, ...]:
        """The ``--data.topk_cache`` arguments of a training stage (none without a cache)."""
        if topk_cache is None:
            return ()
        record = stage(f"topk_{name}", {**settings, "sources": sources_, "steps": settings_.steps,
                                        "batch_size": settings_.batch_size, "mixture_blocks": blocks},
                       lambda f: topk_stage(f, sources=sources_, settings=settings_, mixture_blocks=blocks, **topk_common))
        return ("--data.topk_cache", record["path"])

    stages = ((3 if distil else 5) + len(domains) + (1 if domains else 0) + 1 + 1 + len(scored)
              + (1 if decode.prompt_length else 0) + ((1 + len(domains)) if topk_cache is not None else 0))
    stage = StageRunner(run_dir, stages, reuse=[Path(r) for r in reuse or []])
    tensorboard = run_dir / "tensorboard"
    started = time.perf_counter()

    def do_corpus(folder):
        path = build_corpus(teacher, corpus, corpus_dir, teacher_dtype)
        return {"path": str(path), "domains": read_manifest(path)["domains"]}

    corpus_settings = {"teacher": teacher, "corpus": asdict(corpus), "dir": corpus_dir, "dtype": teacher_dtype}
    corpus_path = Path(stage("corpus", corpus_settings, do_corpus)["path"])
    everything = data_sources(corpus_path, ("general", *DOMAINS)) + list(extra_sources or [])
    common = dict(teacher=teacher, teacher_dtype=teacher_dtype, seq_len=seq_len, val_fraction=val_fraction, seed=seed,
                  tensorboard=tensorboard, trainer=trainer, stage_process=stage_process)

    if distil:
        conversion = stage("convert", {"teacher": teacher, "distil_xlstm": distil_xlstm.to_dict(), "dtype": teacher_dtype,
                                       "seed": seed},
                           lambda f: convert_stage(f, teacher, hybrid, teacher_dtype, student_family, distil_xlstm, seed))
        aligned = conversion["student"]  # nothing to align: KD starts from the fresh xLSTM student
    else:
        conversion = stage("convert", {"teacher": teacher, "hybrid": hybrid.to_dict(), "dtype": teacher_dtype},
                           lambda f: convert_stage(f, teacher, hybrid, teacher_dtype))
        aligned = stage("align", {**settings, "train": asdict(align)},
                        lambda f: train_stage("align", f, sources=everything, settings=align,
                                              student_ckpt=conversion["student"], mixture_blocks=mixture_blocks,
                                              **common))["student"]
    converted = conversion["student"]
    baselines = {}
    if not distil:  # the memory branch off: what the window and sinks alone keep of the teacher
        swa = HybridConfig.from_dict({**hybrid.to_dict(), "mode": "swa"})
        baselines["swa_only"] = stage("convert_swa_only", {"teacher": teacher, "hybrid": swa.to_dict(), "dtype": teacher_dtype},
                                      lambda f: convert_stage(f, teacher, swa, teacher_dtype))["student"]
    kd_cache = cached_topk("kd", everything, kd, mixture_blocks)
    distillation = stage("kd", {**settings, "train": asdict(kd)},
                         lambda f: train_stage("kd", f, sources=everything, settings=kd, student_ckpt=aligned,
                                               mixture_blocks=mixture_blocks, extra=kd_cache, **common))
    distilled = distillation["student"]
    experts = []
    for domain in domains:
        own = (expert_sources or {}).get(domain, [])
        expert_data = data_sources(corpus_path, (domain,)) + own
        expert_cache = cached_topk(f"expert_{domain}", expert_data, expert, None)
        experts.append(stage(f"expert_{domain}", {**settings, "train": asdict(expert), "domain": domain, "sources": own},
                             lambda f, d=domain, data=expert_data, extra=expert_cache: train_stage(
                                 "expert", f, sources=data, settings=expert, student_ckpt=distilled,
                                 extra=("--model.init_args.domain", d, *extra), **common))["student"])

    def do_merge(folder):
        from callbacks import merge_students

        merge_students(experts, merge.method, merge_weights, base=distilled, out=folder / "student",
                       scale=merge.scale, density=merge.density, trim=merge.trim)
        return {"student": str(folder / "student"), "experts": experts}

    students = {**baselines, "converted": converted, **({} if distil else {"aligned": aligned}), "kd": distilled}
    if domains:
        students["merged"] = stage("merge", {**settings, "merge": asdict(merge), "domains": domains}, do_merge)["student"]
    heldout = stage("heldout", {**settings, "blocks_per_domain": eval.heldout_blocks_per_domain, "students": students,
                                "experts": experts},
                    lambda f: heldout_stage(f, teacher, teacher_dtype, students, everything, seq_len, val_fraction, seed,
                                            eval.heldout_blocks_per_domain, experts=dict(zip(domains, experts))))
    scores = {}
    # which students are scored does not change any score, so it is not a setting of the eval stages
    eval_settings = {"teacher": teacher, "dtype": teacher_dtype,
                     "eval": {k: v for k, v in asdict(eval).items() if k != "students"}}
    items = {}
    evaluation = stage("eval_teacher", eval_settings, lambda f: eval_stage(f, None, teacher, eval, teacher_dtype))
    scores["teacher"], items["teacher"] = evaluation["scores"], evaluation["items"]
    for name in scored:
        evaluation = stage(f"eval_{name}", {**eval_settings, "student": students[name], "run": settings},
                           lambda f, p=students[name]: eval_stage(f, p, teacher, eval, teacher_dtype))
        scores[name], items[name] = evaluation["scores"], evaluation["items"]
    decoded = None
    if decode.prompt_length:
        decoded = stage("decode", {"teacher": teacher, "student": students[final], "decode": asdict(decode),
                                   "run": settings},
                        lambda f: decode_stage(f, teacher, students[final], decode))
    description = conversion.get("describe") or hybrid.describe()  # runs converted before descriptions were kept
    md = write_pipeline_report(run_dir, scores, heldout, decoded, stage.timings, eval.target,
                               {**settings, "limit": eval.limit, "student": description}, items=items)
    summary = {"final": final, "describe": description, "students": students, "scores": scores, "heldout": heldout,
               "decode": decoded, "timings": stage.timings, "kd_metrics": distillation.get("metrics", {}),
               "target": eval.target}
    _write_json(run_dir / "summary.json", summary)  # written last: a run folder with it is a finished run
    print("\n" + md)
    print(f"report: {run_dir / 'report.md'}; curve: {run_dir / 'win_tie.png'}; "
          f"TensorBoard: tensorboard --logdir {tensorboard}; this invocation took {time.perf_counter() - started:.0f} s")
    return summary


def function_parser(fn, description: str, config_help: str, **kwargs) -> ArgumentParser:
    """A command line for ``fn``'s arguments, with ``--config`` YAML files (omegaconf interpolation);
    the pipeline's and the sweep's."""
    parser = ArgumentParser(description=description, parser_mode="omegaconf", **kwargs)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    parser.add_function_arguments(fn)
    return parser


def function_arguments(parser: ArgumentParser, args: list[str] | None) -> tuple[dict, Any]:
    """``fn``'s keyword arguments parsed from ``args`` (objects instantiated), and the parsed namespace."""
    cfg = parser.parse_args(args)
    return {k: v for k, v in parser.instantiate(cfg).items() if k != "config"}, cfg


def build_parser(**kwargs) -> ArgumentParser:
    return function_parser(run_pipeline, __doc__.split("\n")[0], "a pipeline YAML (configs/experiments/)", **kwargs)


def main(args: list[str] | None = None) -> dict:
    kwargs, _ = function_arguments(build_parser(), args)
    return run_pipeline(**kwargs)


if __name__ == "__main__":
    main()
