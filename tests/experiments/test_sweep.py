"""Sweeps: points from a grid and a list, overrides on dotted keys, bad points refused before anything
runs, at most `parallel` points at once, and (slow) a tiny sweep end to end: two points finish, a broken
one is recorded without stopping them, a re-run skips the finished ones, and the table, figure and
TensorBoard HParams view hold the points' own numbers."""

import csv
import json
import time
from pathlib import Path

import pytest
import yaml

from experiments import sweep_points as sweep
from experiments.sweep import main
from experiments.sweep_points import SweepPoint, expand_points, get_dotted, run_points, set_dotted
from tests.experiments.test_pipeline import tiny_config


def test_points_are_the_list_crossed_with_the_grid_with_readable_names():
    points = expand_points([{"name": "hybrid"}, {"hybrid.mode": "swa", "hybrid.window": 16}],
                           {"kd.lr": [1e-4, 1e-3], "align.lr": [0.01]})
    names = [n for n, _ in points]
    # the two "lr" keys keep a prefix that tells them apart; values name the rest
    assert names == ["hybrid,kd.lr=0.0001,align.lr=0.01", "hybrid,kd.lr=0.001,align.lr=0.01",
                     "mode=swa,window=16,kd.lr=0.0001,align.lr=0.01", "mode=swa,window=16,kd.lr=0.001,align.lr=0.01"]
    assert points[3][1] == {"hybrid.mode": "swa", "hybrid.window": 16, "kd.lr": 1e-3, "align.lr": 0.01}
    assert [n for n, _ in expand_points(None, {"kd.overrides.model.init_args.top_k": [8, None]})] == \
        ["top_k=8", "top_k=none"]
    assert expand_points([{"hybrid.window": 8}], None) == [("window=8", {"hybrid.window": 8})]
    with pytest.raises(ValueError, match="same name.*distinct 'name'"):
        expand_points([{"name": "a", "kd.lr": 1}, {"name": "a", "kd.lr": 2}], None)
    with pytest.raises(ValueError, match="grid.kd.lr must be a non-empty list"):
        expand_points(None, {"kd.lr": 0.1})


def test_dotted_overrides_descend_into_dicts_and_stage_overrides_take_cli_keys():
    config = {"hybrid": {"window": 64, "mode": "hybrid"}, "kd": {"steps": 6, "overrides": {"model.init_args.top_k": 32}},
              "eval": {"tasks": ["a", "b"]}}
    set_dotted(config, "hybrid.window", 16)
    set_dotted(config, "kd.overrides.model.init_args.top_k", None)
    set_dotted(config, "kd.overrides.model.init_args.temperature", {"kind": "constant", "start": 1.0})
    set_dotted(config, "eval.tasks", ["c"])
    set_dotted(config, "hybrid", {"sink_tokens": 0})  # a dict merges into the dict it overrides
    assert config == {"hybrid": {"window": 16, "mode": "hybrid", "sink_tokens": 0},
                      "kd": {"steps": 6, "overrides": {"model.init_args.top_k": None,
                                                       "model.init_args.temperature": {"kind": "constant", "start": 1.0}}},
                      "eval": {"tasks": ["c"]}}
    assert get_dotted(config, "kd.overrides.model.init_args.top_k", "default") is None
    assert get_dotted(config, "kd.overrides.model.init_args.alpha", "default") == "default"
    assert get_dotted(config, "hybrid.mode") == "hybrid"


def test_a_bad_point_is_refused_before_any_point_runs(tmp_path):
    spec = {"base": "configs/experiments/quickstart.yaml", "out": str(tmp_path / "sweep"),
            "points": [{"name": "fine", "hybrid.window": 16}, {"name": "typo", "hybrid.windw": 16}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"point 'typo'.*'hybrid' does not accept option 'windw'"):
        main(["--config", str(path)])
    with pytest.raises(ValueError, match=r"only=\['nope'\] names no point.*fine, typo"):
        main(["--config", str(path), "--only", '["nope"]'])
    with pytest.raises(FileNotFoundError, match="no such pipeline YAML"):
        main(["--config", str(path), "--base", "configs/experiments/nothing.yaml"])
    assert not (tmp_path / "sweep").exists()


def test_no_more_than_parallel_points_run_at_once(tmp_path, monkeypatch):
    running, peak, order = [], [], []

    held = {}

    class FakeProcess:  # stands in for a pipeline process: each lasts a few polls
        def __init__(self, point, devices=None):
            self.point, self.polls, self.devices = point, 0, devices
            assert devices is None or devices not in held.values(), "a GPU given to two points at once"
            held[point.name] = devices
            running.append(point.name)
            order.append(point.name)
            peak.append(len(running))
            self.proc = self

        def poll(self):
            self.polls += 1
            return 0 if self.polls > 2 else None

        def finish(self):
            running.remove(self.point.name)
            held.pop(self.point.name)
            return {"status": "done", "seconds": 0.0}

    monkeypatch.setattr(sweep, "PointProcess", FakeProcess)
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    points = [SweepPoint(f"p{i}", {}, tmp_path / f"p{i}") for i in range(5)]
    records = run_points(points, parallel=2)
    assert max(peak) == 2 and order == [f"p{i}" for i in range(5)] and set(records) == set(order)
    peak.clear()
    run_points(points, parallel=1)
    assert max(peak) == 1
    # with GPUs: one point per entry of devices, never two on the same entry, all of them used
    peak.clear()
    seen = []
    monkeypatch.setattr(FakeProcess, "poll", lambda self: seen.append(self.devices) or (0 if len(seen) % 3 == 0 else None))
    run_points(points, parallel=3, devices=["0", "1,2"])
    assert max(peak) == 2 and set(seen) == {"0", "1,2"}
    # no room in memory: one point at a time, whatever parallel allows
    peak.clear()
    monkeypatch.setattr(sweep, "available_memory_gb", lambda: 1.0)
    run_points(points, parallel=3, min_free_memory_gb=2.0)
    assert max(peak) == 1


@pytest.mark.slow
def test_tiny_sweep_runs_records_a_failure_and_skips_finished_points(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDISTILL_CACHE", str(tmp_path / "cache"))
    base = tiny_config(tmp_path)
    spec = {
        "base": str(base), "out": str(tmp_path / "sweep"), "parallel": 1, "alphas": [0.0, 0.1],
        # no experts, the stage-2 student scored and no decode: the smallest pipeline that gives every column
        "common": {"domains": [], "expert_sources": None, "eval.students": ["kd"], "decode.prompt_length": 0,
                   "kd.checkpoint_every": 0},
        "points": [{"name": "window4", "hybrid.window": 4},
                   {"name": "window8", "hybrid.window": 8},
                   # valid as a configuration, diverges in its KD stage (after sharing window8's alignment)
                   {"name": "broken", "hybrid.window": 8, "kd.lr": 1.0e+30}],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = main(["--config", str(path)])
    out = capsys.readouterr().out
    assert result["points"] == {"window4": "done", "window8": "done", "broken": "failed"}
    root = tmp_path / "sweep"
    points = root / "points"
    # each point ran with its own resolved configuration
    for name, window in (("window4", 4), ("window8", 8), ("broken", 8)):
        config = yaml.safe_load((points / name / "config.yaml").read_text())
        assert config["hybrid"]["window"] == window and config["domains"] == [] and config["out"] == str(points / name)
    broken = json.loads((points / "broken" / "point.json").read_text())
    assert "NonFiniteLossError: training stopped at step 1" in broken["error"] and broken["returncode"] != 0
    assert "is not finite" in broken["error"]
    assert "broken: FAILED" in out and "training stopped at step 1" in out
    # the broken point's alignment is window8's, copied rather than trained again
    align = json.loads((points / "broken" / "align" / "stage.json").read_text())
    assert align["reused_from"] == str(points / "window8" / "align")
    assert align["result"]["student"] == str(points / "broken" / "align" / "student")
    assert (points / "broken" / "align" / "student" / "model.safetensors").is_file()

    # the table holds each point's own numbers
    from callbacks import critical_tolerance, win_and_tie

    rows = {r["point"]: r for r in csv.DictReader((root / "sweep.csv").open())}
    assert set(rows) == {"window4", "window8", "broken"}
    assert rows["broken"]["status"] == "failed" and "is not finite" in rows["broken"]["error"]
    for name in ("window4", "window8"):
        heldout_all = json.loads((points / name / "heldout" / "heldout.json").read_text())
        heldout = heldout_all["kd"]
        scores = json.loads((points / name / "eval_kd" / "scores.json").read_text())["scores"]
        teacher = json.loads((points / name / "eval_teacher" / "scores.json").read_text())["scores"]
        row = rows[name]
        assert float(row["heldout_ce"]) == pytest.approx(heldout["student_ce"])
        assert float(row["top1_agreement"]) == pytest.approx(heldout["top1_agreement"])
        assert float(row["converted_ce"]) == pytest.approx(heldout_all["converted"]["student_ce"])
        assert float(row["alpha_star"]) == pytest.approx(critical_tolerance(scores, teacher))
        assert float(row["C_0.1"]) == pytest.approx(win_and_tie(scores, teacher, [0.1])[0])
        for task, value in scores.items():
            assert float(row[f"task:{task}"]) == pytest.approx(value)
        assert heldout["domains"]  # every domain's held-out CE, with its interval
        for domain, entry in heldout["domains"].items():
            assert float(row[f"heldout_ce:{domain}"]) == pytest.approx(entry["student_ce"])
            assert float(row[f"heldout_ce:{domain}_low"]) == pytest.approx(entry["student_ce_90"][0])
        assert float(row["kd_tokens_per_s"]) > 0
    # window8 against window4 on the same held-out blocks, paired: the difference of the two CEs
    first = json.loads((points / "window4" / "heldout" / "heldout.json").read_text())["kd"]["student_ce"]
    second = json.loads((points / "window8" / "heldout" / "heldout.json").read_text())["kd"]["student_ce"]
    assert float(rows["window8"]["ce_minus_first"]) == pytest.approx(second - first, abs=1e-9)
    assert float(rows["window8"]["ce_minus_first_low"]) <= float(rows["window8"]["ce_minus_first"]) \
        <= float(rows["window8"]["ce_minus_first_high"])
    assert rows["window4"]["ce_minus_first"] == ""
    md = (root / "sweep.md").read_text()
    assert "CE − window4 [90 %, paired]" in md
    assert "| window4 |" in md and "| window8 |" in md and "failed (see below)" in md and "## Failed points" in md
    assert "## Held-out CE per domain" in md
    curves = list(csv.DictReader((root / "win_tie.csv").open()))
    assert set(curves[0]) == {"alpha", "window4", "window8"} and len(curves) == 101
    assert (root / "win_tie.png").stat().st_size > 0

    # TensorBoard: an HParams view with the swept key for each finished point
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    windows = {}
    for name in ("window4", "window8"):
        events = EventAccumulator(str(root / "tensorboard" / name))
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        windows[name] = info.hparams["hybrid.window"].number_value
    assert windows == {"window4": 4, "window8": 8}
    assert not (root / "tensorboard" / "broken").exists()

    # a re-run skips the finished points (untouched) and tries the failed one again
    stamp = (points / "window4" / "summary.json").stat().st_mtime_ns
    time.sleep(0.01)
    result = main(["--config", str(path)])
    out = capsys.readouterr().out
    assert "window4: finished earlier, skipped" in out and "window8: finished earlier, skipped" in out
    assert "broken: started" in out and "window4: started" not in out
    assert (points / "window4" / "summary.json").stat().st_mtime_ns == stamp
    assert result["points"]["broken"] == "failed"
    # aggregating only starts nothing, and rebuilds the same table
    out_before = (root / "sweep.csv").read_text()
    result = main(["--config", str(path), "--aggregate_only", "true"])
    assert "started" not in capsys.readouterr().out and (root / "sweep.csv").read_text() == out_before
    # a finished point whose configuration changed is refused, naming what changed

    with pytest.raises(ValueError, match=r"'window4'.*another configuration \(changed: kd\)"):
        main(["--config", str(path), "--common", json.dumps({**spec["common"], "kd.steps": 3})])


def test_a_point_process_runs_its_resolved_config_with_its_gpus(tmp_path, monkeypatch):
    calls = []

    class FakePopen:
        def __init__(self, args, cwd, stdout, stderr, env, preexec_fn):
            calls.append((args, env))
            assert preexec_fn is sweep.die_with_parent  # no orphan outlives a killed sweep
            self.returncode = 3

    monkeypatch.setattr(sweep.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(sweep, "provenance", lambda: {"git_commit": "abc"})
    point = SweepPoint("p", {"kd.lr": 1}, tmp_path / "p", config={"out": str(tmp_path / "p")})
    point.folder.mkdir()
    job = sweep.PointProcess(point, devices="2,3")
    args, env = calls[0]
    assert args[1:] == ["-m", "experiments.pipeline", "--config", str(tmp_path / "p" / "config.yaml")]
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    (point.folder / "log.txt").open("a").write("Traceback (most recent call last):\n  File x\nValueError: bad lr\n")
    record = job.finish()
    assert record["status"] == "failed" and record["returncode"] == 3 and record["error"] == "ValueError: bad lr"
    saved = json.loads((point.folder / "point.json").read_text())
    assert saved["error"] == "ValueError: bad lr" and saved["provenance"] == {"git_commit": "abc"}


@pytest.mark.slow
def start_sweep(spec: dict, path: Path, cache: Path):
    """The sweep command as its own process (its output discarded)."""
    import os
    import subprocess
    import sys

    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "XDISTILL_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--config", str(path)], env=env,
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def test_a_terminated_sweep_stops_its_running_points(tmp_path):
    import signal

    import psutil

    base = tiny_config(tmp_path)
    spec = {"base": str(base), "out": str(tmp_path / "sweep"),
            "common": {"domains": [], "expert_sources": None, "decode.prompt_length": 0},
            "points": [{"name": "only", "align.steps": 50}]}
    path = tmp_path / "sweep.yaml"
    sweep_proc = start_sweep(spec, path, tmp_path / "cache")
    log = tmp_path / "sweep" / "points" / "only" / "log.txt"
    deadline = time.time() + 300
    while not (log.is_file() and "align ..." in log.read_text()):
        assert sweep_proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    children = psutil.Process(sweep_proc.pid).children()
    assert children
    sweep_proc.send_signal(signal.SIGTERM)
    assert sweep_proc.wait(timeout=60) == 128 + signal.SIGTERM
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive
    assert not (tmp_path / "sweep" / "points" / "only" / "point.json").exists()  # neither done nor failed


@pytest.mark.slow
def test_a_killed_sweep_takes_its_point_down_and_a_rerun_resumes_the_point(tmp_path, monkeypatch, capsys):
    """SIGKILL (a preempted job): the sweep cannot clean up, yet its running pipeline dies with it
    (no orphan keeps writing), and the same command afterwards finishes the point from the stages
    it had finished."""
    import signal

    import psutil

    monkeypatch.setenv("XDISTILL_CACHE", str(tmp_path / "cache"))
    base = tiny_config(tmp_path)
    spec = {"base": str(base), "out": str(tmp_path / "sweep"),
            "common": {"domains": [], "expert_sources": None, "eval.students": ["kd"], "decode.prompt_length": 0},
            "points": [{"name": "only", "kd.steps": 200, "kd.checkpoint_every": 4}]}
    path = tmp_path / "sweep.yaml"
    sweep_proc = start_sweep(spec, path, tmp_path / "cache")
    point = tmp_path / "sweep" / "points" / "only"
    deadline = time.time() + 300
    while not (point / "kd" / "checkpoints" / "last.ckpt").is_file():  # killed during KD, after a checkpoint
        assert sweep_proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    children = psutil.Process(sweep_proc.pid).children(recursive=True)
    assert children
    sweep_proc.send_signal(signal.SIGKILL)
    sweep_proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert not (point / "point.json").exists() and not (point / "kd" / "stage.json").exists()

    result = main(["--config", str(path)])
    assert result["points"] == {"only": "done"}
    log = (point / "log.txt").read_text()
    assert log.count("] align: finished earlier") == 1 and log.count("] kd: done") == 1
    # KD itself went on from its last checkpoint rather than from step 0
    assert f"Restoring states from the checkpoint path at {point / 'kd' / 'checkpoints' / 'last.ckpt'}" in log
    assert json.loads((point / "point.json").read_text())["status"] == "done"
