"""Merge and evaluate through the CLI: ModelMergeCallback then EvalCallback in one validate run."""

import json

import pytest
import yaml

from experiments.run import main
from models import HybridConfig, convert_to_hybrid, load_teacher, save_student
from tests.callbacks.test_merge import perturbed
from tests.fixtures import make_tokenizer, write_corpus, write_teacher

pytestmark = pytest.mark.slow  # two lm-eval runs of student and teacher (~45 s)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcb")
    write_teacher(root / "teacher")
    corpus = write_corpus(root / "corpus")
    teacher = load_teacher(str(root / "teacher"))
    base = convert_to_hybrid(teacher, HybridConfig(window=8))
    save_student(base, root / "base", tokenizer=make_tokenizer())
    for i, name in enumerate(("math", "code")):
        save_student(perturbed(teacher, i + 1), root / name, tokenizer=make_tokenizer())
    return root, corpus


def run_validate(env, out, cache):
    root, corpus = env
    config = {"trainer": {"callbacks": [
        {"class_path": "callbacks.ModelMergeCallback",
         "init_args": {"experts": [str(root / "math"), str(root / "code")], "out": str(out / "merged"),
                       "method": "task_arithmetic", "base": str(root / "base"), "scale": 0.5}},
        {"class_path": "callbacks.EvalCallback",
         "init_args": {"tasks": ["xd_arith_mc", "xd_cloze_mc"], "limit": 4, "batch_size": 4,
                       "out_dir": str(out / "eval"), "cache_dir": str(cache)}}]}}
    (out / "cb.yaml").parent.mkdir(parents=True, exist_ok=True)
    (out / "cb.yaml").write_text(yaml.safe_dump(config))
    sources = json.dumps([{"path": str(corpus["text"])}])
    return main(["validate", "--config", "configs/stages/merge.yaml", "--config", str(out / "cb.yaml"),
                 "--model.init_args.teacher", str(root / "teacher"),
                 "--model.init_args.student_ckpt", str(out / "merged"), "--data.sources", sources,
                 "--data.seq_len", "32", "--data.batch_size", "4", "--data.cache_dir", str(root / "cache"),
                 "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
                 "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(out / "runs")])


def test_merge_then_evaluate_in_one_validate_run(env, tmp_path, monkeypatch):
    run_validate(env, tmp_path / "a", tmp_path / "cache")
    assert (tmp_path / "a" / "merged" / "merge.json").is_file()
    scores = json.loads((tmp_path / "a" / "eval" / "scores.json").read_text())
    assert set(scores["student"]) == set(scores["teacher"]) == {"xd_arith_mc", "xd_cloze_mc"}
    assert (tmp_path / "a" / "eval" / "win_tie.png").is_file() and (tmp_path / "a" / "eval" / "win_tie.csv").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "a" / "runs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert {"eval/alpha_star", "eval/win_tie@0.01", "eval/student/xd_arith_mc"} <= set(events.Tags()["scalars"])
    assert "eval/win_tie" in events.Tags()["images"]
    # the teacher's scores come from the cache the second time
    import callbacks.eval
    import callbacks.scoring

    calls = []
    real = callbacks.scoring.evaluate_model
    counted = lambda model, *a, **k: calls.append(model) or real(model, *a, **k)  # noqa: E731
    for module in (callbacks.eval, callbacks.scoring):  # the callback's student, the cache's teacher
        monkeypatch.setattr(module, "evaluate_model", counted)
    run_validate(env, tmp_path / "b", tmp_path / "cache")
    assert len(calls) == 1  # the student only


def test_a_corrupt_teacher_score_cache_is_scored_again(tmp_path, monkeypatch):
    import callbacks.scoring as ev
    from tests.conftest import make_teacher

    calls = []
    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **k: (calls.append(1) or {"task": 0.25}, {}))
    teacher = make_teacher("llama")
    assert ev.cached_teacher_scores(teacher, None, ["task"], cache_dir=tmp_path) == {"task": 0.25}
    assert ev.cached_teacher_scores(teacher, None, ["task"], cache_dir=tmp_path) == {"task": 0.25}
    assert len(calls) == 1  # the second call read the cache
    (cache,) = (tmp_path / "eval").glob("teacher-*.json")
    cache.write_text(cache.read_text()[:10])
    with pytest.warns(UserWarning, match=rf"cached teacher scores {cache} cannot be read"):
        assert ev.cached_teacher_scores(teacher, None, ["task"], cache_dir=tmp_path) == {"task": 0.25}
    assert len(calls) == 2 and json.loads(cache.read_text())["scores"] == {"task": 0.25}
