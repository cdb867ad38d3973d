"""The one-command pipeline: stages skip once done, refuse changed settings, and a run killed
midway resumes and completes (end to end on a tiny random teacher: `slow`)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from experiments.pipeline import main
from tests.fixtures import write_corpus, write_teacher

STAGES = ["corpus", "convert", "align", "convert_swa_only", "topk_kd", "kd", "topk_expert_math", "expert_math",
          "topk_expert_code", "expert_code", "topk_expert_stem", "expert_stem", "topk_expert_chat", "expert_chat", "merge",
          "heldout", "eval_teacher", "eval_swa_only", "eval_converted", "eval_aligned", "eval_kd", "eval_merged",
          "decode"]


def test_bad_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="domains.*math, code, stem, chat"):
        main(["--out", str(tmp_path / "run"), "--domains", '["math", "poetry"]'])
    with pytest.raises(ValueError, match="DataSource.format"):
        main(["--out", str(tmp_path / "run"), "--extra_sources", '[{"path": "x.jsonl", "format": "poem"}]'])
    with pytest.raises(ValueError, match="teacher_dtype"):
        main(["--out", str(tmp_path / "run"), "--teacher_dtype", "float13"])
    with pytest.raises(ValueError, match="names 'merged' but domains is empty"):
        main(["--out", str(tmp_path / "run"), "--domains", "[]", "--eval.students", '["merged"]'])
    with pytest.raises(ValueError, match="eval.students has \\['best'\\]"):
        main(["--out", str(tmp_path / "run"), "--eval.students", '["best"]'])
    with pytest.raises(ValueError, match=r"merge.weights names .*missing: \['chat'\]"):
        main(["--out", str(tmp_path / "run"), "--merge.weights", '{"math": 0.5, "code": 0.3, "stem": 0.2}'])
    with pytest.raises(ValueError, match="merge.weights has 2 values for 4 domains"):
        main(["--out", str(tmp_path / "run"), "--merge.weights", "[0.5, 0.5]"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ({"kd": {"overrides": {"model.init_args.top_kk": 8}}}, r"the kd stage's settings do not parse"),
    ({"kd": {"overrides": {"model.init_args.preset": None, "model.init_args.top_k": 0}}}, r"the kd stage's settings are refused: .*top_k=0 is invalid"),
    ({"kd": {"overrides": {"model.init_args.preset": None, "model.init_args.top_k": 500}}}, r"top_k=500 is larger than the teacher's vocabulary"),
    ({"hybrid": {"window": 24, "sink_tokens": 2, "chunk_size": 16}},
     r"the align stage's settings are refused: model.init_args.hybrid.window=24 is not smaller than data.seq_len=24"),
    ({"expert": {"overrides": {"trainer.strategy": "fsdp"}}}, r"the expert stage's settings are refused: trainer.strategy"),
])
def test_a_bad_stage_setting_is_refused_before_the_first_stage(tmp_path, monkeypatch, override, message):
    import experiments.pipeline as pipeline

    monkeypatch.setattr(pipeline, "build_corpus", lambda *a, **k: pytest.fail("the corpus stage started"))
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    for key, value in override.items():
        config[key] = {**config[key], **value}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises((ValueError, TypeError), match="(?s)" + message):
        main(["--config", str(tmp_path / "bad.yaml")])
    assert not (tmp_path / "run").exists()


def tiny_config(root: Path) -> Path:
    teacher = write_teacher(root / "teacher")
    own = write_corpus(root / "own")
    config = {
        "extra_sources": [{"path": str(own["text"]), "name": "own_text"}],
        "expert_sources": {"chat": [{"path": str(own["chat"]), "format": "chat", "name": "own_chat"}]},
        "out": str(root / "run"), "teacher": str(teacher), "corpus_dir": str(root / "corpus"),
        "hybrid": {"window": 8, "sink_tokens": 2, "chunk_size": 16}, "seq_len": 24, "val_fraction": 0.4, "mixture_blocks": 40,
        "corpus": {"code_files": 6, "code_max_chars": 1500, "general_max_topics": 6, "math_problems": 60,
                   "stem_prompts": 12, "chat_prompts": 12, "answer_tokens": 8, "generation_batch_size": 6},
        "align": {"steps": 2, "batch_size": 2, "lr": 1.0e-3, "trainable": "new"},
        "kd": {"steps": 2, "batch_size": 2, "val_batches": 1, "checkpoint_every": 1},
        "expert": {"steps": 1, "batch_size": 2},
        "merge": {"method": "task_arithmetic", "scale": 0.5},
        "eval": {"tasks": ["xd_arith_mc", "xd_instruct_gen"], "limit": 3, "batch_size": 2, "heldout_blocks_per_domain": 1,
                 "suite": {"mc_items": 3, "gen_items": 3, "needle_items": 2, "needle_lengths": [64]}},
        "decode": {"prompt_length": 16, "new_tokens": 2, "warmup": 1},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_pipeline_end_to_end_resumes_after_a_kill_and_skips_when_done(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDISTILL_CACHE", str(tmp_path / "cache"))
    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    env = {**os.environ, "XDISTILL_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    # first run, in a process killed (SIGKILL) once the KD stage has finished
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.pipeline", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[2])
    deadline = time.time() + 600
    while not (run / "kd" / "stage.json").is_file():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "the KD stage did not finish in 10 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "report.md").exists()
    done_before = {s for s in STAGES if (run / s / "stage.json").is_file()}
    assert {"corpus", "convert", "align", "kd"} <= done_before

    # the second run finishes only what was left
    result = main(["--config", str(config)])
    out = capsys.readouterr().out
    for stage in done_before:
        assert f"{stage}: finished earlier" in out, stage
    for stage in STAGES:
        assert (run / stage / "stage.json").is_file(), stage
    for stage in ("align", "kd", "expert_math", "expert_code", "expert_stem", "expert_chat", "merge", "convert"):
        assert (run / stage / "student" / "model.safetensors").is_file(), stage
        assert not (run / stage / "checkpoints").exists(), stage  # removed once the student is saved
    for name in ("report.md", "win_tie.png", "win_tie.csv", "scores.json"):
        assert (run / name).is_file(), name
    report = (run / "report.md").read_text()
    assert "| xd_arith_mc" in report and "alpha*" in report and "ms/token" in report
    assert set(result["scores"]) == {"teacher", "swa_only", "converted", "aligned", "kd", "merged"}
    # the report's numbers are those of the eval stages' own score files
    from callbacks import critical_tolerance

    stage_scores = {n: json.loads((run / f"eval_{n}" / "scores.json").read_text())["scores"] for n in result["scores"]}
    summary = json.loads((run / "scores.json").read_text())
    assert summary["student"] == stage_scores["merged"] and summary["teacher"] == stage_scores["teacher"]
    assert summary["alpha_star"] == critical_tolerance(stage_scores["merged"], stage_scores["teacher"])
    assert set(result["heldout"]) >= {"swa_only", "converted", "kd", "merged", "teacher", "tokens"}
    assert "ce_minus_baseline_90" in result["heldout"]["merged"] and "## Held-out text" in report
    # stage by stage, paired; each expert against the merged student on its own domain
    assert set(result["heldout"]["pairs"]) == {"aligned - converted", "kd - aligned", "merged - kd",
                                               "swa_only - converted", "kd - converted"}
    assert set(result["heldout"]["experts"]) == {"math", "code", "stem", "chat"} and "Stage by stage" in report
    # KD and the experts trained on the teacher's top-k computed once, over exactly their blocks
    kd_cache = json.loads((run / "topk_kd" / "stage.json").read_text())["result"]
    assert kd_cache["blocks"] == 2 * 2 and Path(kd_cache["path"]).is_relative_to(tmp_path / "cache" / "topk")
    assert list(run.glob("tensorboard/*/version_0/events.out.tfevents*")) and list(run.glob("tensorboard/report/events*"))
    chat_args = json.loads((run / "expert_chat" / "stage.json").read_text())["settings"]["sources"]
    assert chat_args[0]["name"] == "own_chat"
    merge = json.loads((run / "merge" / "student" / "merge.json").read_text())
    assert merge["method"] == "task_arithmetic"

    # a third run skips every stage and changes no student
    stamp = (run / "merge" / "student" / "model.safetensors").stat().st_mtime_ns
    main(["--config", str(config)])
    out = capsys.readouterr().out
    assert out.count("finished earlier") == len(STAGES)
    assert (run / "merge" / "student" / "model.safetensors").stat().st_mtime_ns == stamp
    # changed settings on a finished run are refused, naming the stage
    with pytest.raises(ValueError, match="stage 'topk_kd'.*steps"):  # the first stage that reads kd.steps
        main(["--config", str(config), "--kd.steps", "3"])


@pytest.mark.slow
def test_distil_xlstm_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    """student_family distil_xlstm: no align stage, KD with the Frobenius term, experts, merge,
    held-out and suite scores of Distil-xLSTM students, decode of the merged one."""
    from models import DistilXLSTMStudent, load_student

    monkeypatch.setenv("XDISTILL_CACHE", str(tmp_path / "cache"))
    config = tiny_config(tmp_path)
    beta = '{"kind": "delta", "start": 0.2, "end": 0.1, "delta": 0.05}'
    result = main(["--config", str(config), "--out", str(tmp_path / "distil"), "--student_family", "distil_xlstm",
                   "--distil_xlstm.num_blocks", "2", "--distil_xlstm.chunk_size", "16", "--kd.trainable", "new",
                   "--kd.checkpoint_every", "0", "--kd.overrides", '{"model.init_args.beta": ' + beta + "}",
                   "--expert.trainable", "new"])
    run = tmp_path / "distil"
    stages = [s for s in STAGES if s not in ("align", "convert_swa_only", "eval_swa_only", "eval_aligned")]  # no hybrid baseline
    assert sorted(p.parent.name for p in run.glob("*/stage.json")) == sorted(stages)
    for stage in ("convert", "kd", "expert_chat", "merge"):
        student = load_student(run / stage / "student")
        assert isinstance(student, DistilXLSTMStudent) and student.block_kinds() == ["slstm", "mlstm"], stage
    report = (run / "report.md").read_text()
    assert "distil_xlstm, 2 blocks (1 sLSTM, 1 mLSTM)" in report and "ms/token" in report
    assert set(result["heldout"]) >= {"converted", "kd", "merged"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / "kd" / "version_0"))
    events.Reload()
    assert "train/frobenius" in events.Tags()["scalars"]


def test_heldout_pairs_are_differences_of_the_same_blocks():
    from experiments.heldout import summarise

    def rows(values):
        return [{"student_ce": v, "kl_teacher_student": v / 2, "top1_agreement": 1.0, "n": 1} for v in values]

    scores = {"teacher": {"a": rows([1, 1, 1])}, "x": {"a": rows([2.0, 3.0, 4.0])}, "y": {"a": rows([1.5, 2.0, 2.5])}}
    pair = summarise(scores, None, iterations=300, seed=0, pairs=[("x", "y")])["pairs"]["x - y"]["all"]
    assert pair["student_ce"] == pytest.approx(1.0) and pair["kl_teacher_student"] == pytest.approx(0.5)
    lo, hi = pair["student_ce_90"]
    assert 0.5 <= lo <= 1.0 <= hi <= 1.5  # resampled block differences lie in [0.5, 1.5]
