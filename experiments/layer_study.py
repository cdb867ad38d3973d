"""Which hybrid layer starts closest to its teacher, and which gains most from the alignment stage.

    python -m experiments.layer_study --config configs/studies/layer.yaml
    python -m experiments.layer_study --config configs/studies/layer.yaml --skip_align true   # conversions only

Each variant (a set of ``HybridConfig`` fields) converts the teacher, is scored on the same
held-out blocks of every domain (equal tokens per domain, documents the alignment never trains on),
runs the default alignment stage (``configs/stages/align.yaml`` with the quickstart's budget) and is
scored again. Scores: cross-entropy of the next token, KL(teacher || student) and top-1 agreement,
per domain and overall, with 90 % bootstrap intervals over blocks; and each variant's CE minus the
baseline variant's (``baseline``, default the SWA-only conversion) on the same blocks, with a
paired bootstrap interval. Writes ``results.json`` and ``results.md`` into ``out`` (atomically);
every stage (corpus, conversions, alignments, scores) is recorded in ``work`` and skipped when a
previous run finished it with the same settings, so an interrupted study resumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from datamodules.corpus import DOMAINS, CorpusConfig, build_corpus
from experiments.heldout import block_scores, select_blocks, summarise
from experiments.runner import StageRunner
from experiments.stages import TrainSettings, data_sources, train_stage
from models import HybridConfig
from models.config import PREVIOUS_LAYER
from models.storage import atomic_file_write, write_json

DEFAULT_VARIANTS = {
    "hybrid, paper layer": {},
    "hybrid, previous layer": PREVIOUS_LAYER,
    "SWA only": {"mode": "swa"},
    "mLSTM only, feature maps": {"mode": "mlstm"},
    "mLSTM only, raw q/k": {"mode": "mlstm", "feature_map": "none"},
    "mLSTM only, previous layer": {"mode": "mlstm", **PREVIOUS_LAYER},
}


@dataclass
class HeldoutSettings:
    """The held-out blocks: ``blocks_per_domain`` blocks of ``seq_len`` tokens from each domain's
    held-out documents (the ``val_fraction`` split, which the alignment stage does not train on)."""

    blocks_per_domain: int = 4
    seq_len: int = 512
    val_fraction: float = 0.25
    bootstrap: int = 2000
    """Bootstrap resamples of the blocks (intervals are the 5th and 95th percentiles)."""
    spread: bool = True
    """Blocks evenly spaced through each domain's held-out text (false: its first blocks, as the
    committed results of configs/studies/layer*.yaml were made)."""


def heldout_blocks(corpus: Path, teacher: str, settings: HeldoutSettings, seed: int) -> dict[str, torch.Tensor]:
    """{domain: input ids [blocks_per_domain, seq_len]}; a clear error when a domain has too few."""
    from datamodules import DataSource, TextDataModule

    data = TextDataModule(tokenizer=teacher, sources=[DataSource(**s) for s in data_sources(corpus, DOMAINS)],
                          seq_len=settings.seq_len, batch_size=1, val_fraction=settings.val_fraction, seed=seed)
    data.setup("validate")
    return select_blocks(data.validation_blocks_by_source(), settings.blocks_per_domain, settings.spread)


def mix_gate_trajectory(logs: Path) -> dict | None:
    """The mean mix gate o an alignment run logged (``gate/mean_o``, ``gate/mean_o_layer_XX``): at
    its first and last step, and each layer's at the last step. None when the layer has no mix."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(logs.glob("version_*"))
    if not runs:
        return None
    events = EventAccumulator(str(runs[-1]), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    if "gate/mean_o" not in tags:
        return None
    mean = [e.value for e in events.Scalars("gate/mean_o")]
    layers = [events.Scalars(t)[-1].value for t in sorted(t for t in tags if t.startswith("gate/mean_o_layer_"))]
    return {"first": mean[0], "last": mean[-1], "steps": len(mean), "last_per_layer": layers}


def markdown(summary: dict, baseline: str | None, vocab: int, command: str, tokens_per_domain: int,
             gates: dict | None = None) -> str:
    """Two tables: every student overall (intervals, CE minus the baseline's), then per domain; and
    the mean mix gate o over each alignment run."""
    domains = [d for d in next(iter(summary.values())) if d != "all"]
    base = baseline.rsplit(" @ ", 1)[0] if baseline else "baseline"

    def span(entry, key, fmt):
        lo, hi = entry[f"{key}_90"]
        return f"{entry[key]:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"

    lines = [f"Command: `{command}`", "",
             f"Held-out: {tokens_per_domain} scored tokens per domain ({', '.join(domains)}); [90 % bootstrap "
             f"interval over blocks]; ln(vocab) = {math.log(vocab):.3f} is a uniform guess's CE.", "",
             f"| student | stage | CE | CE - {base} (paired) | KL(teacher ‖ student) | top-1 agreement |",
             "|---|---|---:|---:|---:|---:|"]
    students = [k for k in summary if k != "teacher"]
    for key in students:
        name, stage = key.rsplit(" @ ", 1)
        a = summary[key]["all"]
        diff = span(a, "ce_minus_baseline", "+.3f") if "ce_minus_baseline" in a else "(baseline)" if key == baseline else ""
        lines.append(f"| {name} | {stage} | {span(a, 'student_ce', '.3f')} | {diff} | "
                     f"{span(a, 'kl_teacher_student', '.3f')} | {span(a, 'top1_agreement', '.3f')} |")
    lines.append(f"| teacher | | {span(summary['teacher']['all'], 'student_ce', '.3f')} | | | |")
    lines += ["", "Per domain: CE / KL / top-1 agreement.", "",
              "| student | stage | " + " | ".join(domains) + " |", "|---|---|" + "---:|" * len(domains)]
    for key in students:
        name, stage = key.rsplit(" @ ", 1)
        cells = [f"{summary[key][d]['student_ce']:.2f} / {summary[key][d]['kl_teacher_student']:.2f} / "
                 f"{summary[key][d]['top1_agreement']:.2f}" for d in domains]
        lines.append(f"| {name} | {stage} | " + " | ".join(cells) + " |")
    lines.append("| teacher | | " + " | ".join(f"{summary['teacher'][d]['student_ce']:.2f}" for d in domains) + " |")
    logged = {name: g for name, g in (gates or {}).items() if g}
    if logged:
        lines += ["", "Mean mix gate o during alignment (TensorBoard `gate/mean_o`): first step → last step; per "
                  "layer at the last step.", "", "| student | o, first → last | per layer, last step |",
                  "|---|---:|---:|"]
        for name, g in logged.items():
            per_layer = g["last_per_layer"]
            span_layers = f"{min(per_layer):.3f} – {max(per_layer):.3f}" if per_layer else ""
            lines.append(f"| {name} | {g['first']:.4f} → {g['last']:.4f} ({g['steps']} steps) | {span_layers} |")
    return "\n".join(lines) + "\n"


def run_study(out: str = "docs/results/layer_study", work: str = "runs/studies/layer", reuse: list[str] | None = None,
              teacher: str = "smollm2-135m-instruct",
              hybrid: HybridConfig = HybridConfig(), variants: dict[str, dict] | None = None,
              baseline: str | None = "SWA only", corpus: CorpusConfig = CorpusConfig(),
              heldout: HeldoutSettings = HeldoutSettings(),
              align: TrainSettings = TrainSettings(steps=16, batch_size=4, lr=1e-3, trainable="new", val_batches=0),
              mixture_blocks: int | None = 480, seed: int = 0, skip_align: bool = False,
              trainer: list[str] | None = None,
              command: str = "") -> dict:
    """Run the study (see the module docstring). ``out``: where ``results.json`` and ``results.md``
    go (small, meant to be committed); ``work``: the students, stage records and TensorBoard logs
    (large); ``reuse``: other ``work`` folders whose stages finished with the same settings are
    copied rather than run again. ``hybrid``: the fields every variant starts from; ``variants``:
    {name: HybridConfig fields over ``hybrid``} (None: ``DEFAULT_VARIANTS``)."""
    from models import convert_to_hybrid, load_student, load_teacher, load_tokenizer, save_student

    variants = DEFAULT_VARIANTS if variants is None else variants
    trainer = ["configs/trainer/cpu.yaml"] if trainer is None else trainer
    if baseline is not None and baseline not in variants:
        raise ValueError(f"baseline={baseline!r} is not one of the variants ({', '.join(variants)})")
    out_dir, work_dir = Path(out), Path(work)
    configs = {name: HybridConfig.from_dict({**hybrid.to_dict(), **fields}) for name, fields in variants.items()}
    started = time.perf_counter()
    def aligns(cfg):  # an SWA-only student has no new parameter that reaches the output
        return not skip_align and not (cfg.mode == "swa" and align.trainable == "new")

    # corpus, a conversion per variant, an alignment per variant that has something to align, scores
    stage = StageRunner(work_dir, 2 + len(variants) + sum(map(aligns, configs.values())), reuse=[Path(r) for r in reuse or []])
    corpus_path = Path(stage("corpus", {"teacher": teacher, "corpus": asdict(corpus)},
                             lambda f: {"path": str(build_corpus(teacher, corpus))})["path"])
    blocks = heldout_blocks(corpus_path, teacher, heldout, seed)  # before any training: fail fast
    model = load_teacher(teacher)
    tokenizer = load_tokenizer(teacher)
    students, gates = {}, {}
    for name, cfg in configs.items():
        slug = name.replace(", ", "_").replace(" ", "-").replace("/", "-")
        converted = stage(f"convert_{slug}", {"teacher": teacher, "hybrid": cfg.to_dict()},
                          lambda f, cfg=cfg: {"student": str(save_student(convert_to_hybrid(model, cfg).eval(),
                                                                          f / "student", tokenizer=tokenizer))})
        students[f"{name} @ converted"] = converted["student"]
        if not aligns(cfg):
            continue
        common = dict(teacher=teacher, teacher_dtype="float32", seq_len=heldout.seq_len,
                      val_fraction=heldout.val_fraction, seed=seed, tensorboard=work_dir / "tensorboard",
                      trainer=trainer, stage_process=False)
        aligned = stage(f"align_{slug}", {"hybrid": cfg.to_dict(), "train": asdict(align), "corpus": str(corpus_path),
                                          "val_fraction": heldout.val_fraction, "seq_len": heldout.seq_len,
                                          "mixture_blocks": mixture_blocks, "seed": seed},
                        lambda f, converted=converted: train_stage(
                            "align", f, sources=data_sources(corpus_path, DOMAINS), settings=align,
                            student_ckpt=converted["student"], mixture_blocks=mixture_blocks, **common))
        students[f"{name} @ aligned"] = aligned["student"]
        if cfg.mode == "hybrid":
            gates[name] = mix_gate_trajectory(work_dir / "tensorboard" / f"align_{slug}")

    def score(folder):
        loaded = {name: load_student(path).eval() for name, path in students.items()}
        return block_scores(model.eval(), loaded, blocks)

    scores = stage("score", {"students": students, "heldout": asdict(heldout), "seed": seed}, score)
    base_key = f"{baseline} @ converted" if baseline else None
    summary = summarise(scores, base_key, heldout.bootstrap, seed)
    result = {"teacher": teacher, "variants": {n: c.to_dict() for n, c in configs.items()}, "students": students,
              "summary": summary, "mix_gate_during_alignment": gates, "tokens_per_domain": heldout.blocks_per_domain * (heldout.seq_len - 1),
              "vocab_size": model.config.vocab_size, "align": asdict(align), "seconds": time.perf_counter() - started}
    write_json(out_dir / "results.json", result)
    table = markdown(summary, base_key, model.config.vocab_size, command, result["tokens_per_domain"], gates)
    atomic_file_write(out_dir / "results.md", lambda tmp: tmp.write_text(table))
    print(table)
    return result


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], parser_mode="omegaconf")
    parser.add_argument("--config", action=ActionConfigFile, help="a study YAML (configs/studies/)")
    parser.add_function_arguments(run_study, skip={"command"})
    return parser


def main(argv=None) -> dict:
    import shlex
    import sys

    parser = build_parser()
    kwargs = {k: v for k, v in parser.instantiate(parser.parse_args(argv)).items() if k != "config"}
    command = "python -m experiments.layer_study " + shlex.join(sys.argv[1:] if argv is None else argv)
    return run_study(**kwargs, command=command)


if __name__ == "__main__":
    main()
