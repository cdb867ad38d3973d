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
import time
from dataclasses import asdict
from pathlib import Path

import torch
from jsonargparse import ArgumentParser

from datamodules.corpus import CorpusConfig, build_corpus, read_manifest
from experiments.report import STUDENT_KEYS, write_pipeline_report
from experiments.runner import StageRunner, function_arguments, function_parser
from experiments.stages import (
    DOMAINS, DecodeSettings, EvalSettings, MergeSettings, TrainSettings, check_stage_arguments, convert_stage,
    data_sources, decode_stage, eval_stage, expert_weights, heldout_stage, stage_arguments, topk_stage, train_stage,
)
from models import DistilXLSTMConfig, HybridConfig
from models.checkpoint import STUDENT_FAMILIES
from models.storage import write_json


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
    if student_family not in STUDENT_FAMILIES:
        raise ValueError(f"student_family={student_family!r} is not supported; allowed values: "
                         f"{', '.join(STUDENT_FAMILIES)}")
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
    write_json(run_dir / "pipeline.json", {**settings, "align": asdict(align), "kd": asdict(kd), "expert": asdict(expert),
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
    write_json(run_dir / "summary.json", summary)  # written last: a run folder with it is a finished run
    print("\n" + md)
    print(f"report: {run_dir / 'report.md'}; curve: {run_dir / 'win_tie.png'}; "
          f"TensorBoard: tensorboard --logdir {tensorboard}; this invocation took {time.perf_counter() - started:.0f} s")
    return summary


def build_parser(**kwargs) -> ArgumentParser:
    return function_parser(run_pipeline, __doc__.split("\n")[0], "a pipeline YAML (configs/experiments/)", **kwargs)


def main(args: list[str] | None = None) -> dict:
    kwargs, _ = function_arguments(build_parser(), args)
    return run_pipeline(**kwargs)


if __name__ == "__main__":
    main()
