"""The pipeline's stages as plain functions (each writes into its own folder and returns what the
next stages need) and the settings the pipeline's YAML gives them."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datamodules.corpus import read_manifest
from datamodules.eval_suite import SuiteSize
from experiments.report import STAGE_PAIRS, STUDENT_KEYS
from experiments.runner import PROJECT, die_with_parent
from models import DistilXLSTMConfig, HybridConfig
from models.storage import write_json, write_text

DOMAINS = ("math", "code", "stem", "chat")


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


def scoring_device() -> torch.device:
    """Where scoring runs: the first GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def data_sources(corpus: Path, domains: tuple[str, ...]) -> list[dict]:
    """DataSource dicts for the corpus files of ``domains`` (equal weights)."""
    manifest = read_manifest(corpus)
    return [{"path": str(corpus / manifest["domains"][d]["file"]), "name": d,
             "format": manifest["domains"][d]["format"], "weight": 1.0} for d in domains]


def project_path(path: str) -> str:
    """Config paths are relative to the project (the pipeline runs from any folder)."""
    return str(path if Path(path).is_absolute() else PROJECT / path)


def stage_arguments(stage: str, folder: Path, *, teacher: str, teacher_dtype: str, sources: list[dict], seq_len: int,
                    val_fraction: float, seed: int, settings: TrainSettings, tensorboard: Path, trainer: list[str],
                    mixture_blocks: int | None = None, student_ckpt: str | None = None,
                    extra: tuple[str, ...] = ()) -> list[str]:
    """The ``experiments.run fit`` arguments of one training stage (configs/stages/<stage>.yaml plus
    the pipeline's settings and the stage's overrides)."""
    checkpoints = folder / "checkpoints"
    args = ["fit", "--config", project_path(f"configs/stages/{stage}.yaml")]
    for path in trainer:
        args += ["--config", project_path(path)]
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
    experiments.run`` process; resumes from the stage's last.ckpt if one was saved.

    The stage runs from ``<folder>/config.yaml``, its whole configuration written first (every default
    spelled out), so ``python -m experiments.run fit --config <folder>/config.yaml`` reruns it alone."""
    import subprocess
    import sys

    from experiments.run import stage_config_yaml

    config = folder / "config.yaml"
    write_text(config, stage_config_yaml([a for a in stage_arguments(stage, folder, **kwargs) if a != "fit"]))
    args = ["fit", "--config", str(config)]
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
    from models.storage import cache_dir
    from models.teacher import teacher_fingerprint

    data = TextDataModule(tokenizer=teacher, sources=[DataSource(**s) for s in sources], seq_len=seq_len,
                          batch_size=settings.batch_size, seed=seed, val_fraction=val_fraction,
                          mixture_blocks=mixture_blocks)
    data.setup("fit")
    blocks = data.train_set.tensors
    order = torch.tensor(blocks_read(len(data.train_set), seed, settings.batch_size, settings.steps))
    ids, labels = blocks["input_ids"][order], blocks["labels"][order]
    model = load_teacher(teacher, dtype=getattr(torch, teacher_dtype), device=scoring_device())
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
    device = scoring_device()
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
    write_json(folder / "heldout.json", result)
    return result


def eval_stage(folder: Path, model_path: str | None, teacher: str, settings: EvalSettings, dtype: str) -> dict:
    """One model's scores and per-item scores on the task list ({"scores", "items"}; ``model_path``
    None: the teacher). Cached across runs by weights: the teacher and the fresh conversions are
    scored once per config, and a rerun into another folder reuses every score."""
    from callbacks.scoring import cached_evaluation, cached_teacher_evaluation, weights_fingerprint
    from models import load_student, load_teacher, load_tokenizer

    if settings.offline:
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    tokenizer = load_tokenizer(teacher)
    args = (settings.tasks, settings.include_path, settings.num_fewshot, settings.limit, settings.batch_size)
    if model_path is None:
        evaluation = cached_teacher_evaluation(load_teacher(teacher, dtype=getattr(torch, dtype), device=scoring_device()),
                                               tokenizer, *args, suite=settings.suite)
    else:
        evaluation = cached_evaluation(load_student(model_path).eval().to(scoring_device()), tokenizer, *args,
                                       suite=settings.suite, fingerprint=weights_fingerprint(model_path), role="student")
    write_json(folder / "scores.json", evaluation)
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

