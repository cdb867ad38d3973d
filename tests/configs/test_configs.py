"""Every YAML under configs/ instantiates through the CLI (run=False), and opens with its command."""

from pathlib import Path

import pytest
import torch
import yaml

from experiments.run import PlannedStageCLI, main

CONFIGS = sorted(Path("configs").rglob("*.yaml"))
STAGES = [p for p in CONFIGS if p.parent.name == "stages"]
PIPELINES = [p for p in CONFIGS if p.parent.name == "experiments"]
SWEEPS = [p for p in CONFIGS if p.parent.name == "sweeps"]
BENCH = [p for p in CONFIGS if p.parent.name == "bench"]  # parsed by tests/experiments/test_bench.py
STUDIES = [p for p in CONFIGS if p.parent.name == "studies"]
# what a config's own opening command adds to it (the paper's 512-token window needs blocks longer
# than the example data's 256 tokens)
EXTRA_ARGS = {Path("configs/students/hybrid-w512.yaml"): ["--data.seq_len", "2048"]}


def test_there_are_configs_and_each_starts_with_its_command():
    assert STAGES
    for path in CONFIGS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# python -m experiments."), f"{path} must open with the command that runs it"


@pytest.mark.parametrize("path", [p for p in CONFIGS if p not in PIPELINES + SWEEPS + BENCH + STUDIES], ids=str)
def test_config_instantiates(path, tmp_path):
    needs_gpu = "gpu" in path.read_text() and not torch.cuda.is_available()
    if needs_gpu:
        # the Trainer refuses a GPU strategy without CUDA; check every class it names resolves
        import importlib

        text = yaml.safe_load(path.read_text())
        assert text["trainer"]["accelerator"] == "gpu"
        strategy = text["trainer"].get("strategy")
        for name in [strategy["class_path"]] if strategy else []:
            module, _, attr = name.rpartition(".")
            assert hasattr(importlib.import_module(module), attr), name
        return
    stage = path if path in STAGES else Path("configs/stages/align.yaml")
    args = ["--config", str(stage)]
    if path.parent.name == "students":  # a HybridConfig file: the stage's hybrid argument
        args += ["--model.init_args.hybrid", str(path)]
    elif path != stage:
        args += ["--config", str(path)]
    if path.parent.name != "data":
        args += ["--config", "configs/data/example.yaml"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path), *EXTRA_ARGS.get(path, [])]
    # the stage configs name the student folders earlier stages write: check them as planned stages
    cli = main(args, run=False, cli_class=PlannedStageCLI)
    assert cli.model.__class__.__name__.endswith("Module")
    assert cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("path", PIPELINES, ids=str)
def test_pipeline_config_parses_and_names_existing_trainer_configs(path):
    from experiments.pipeline import build_parser
    from experiments.stages import TrainSettings

    parser = build_parser()
    init = parser.instantiate(parser.parse_args(["--config", str(path)]))
    assert isinstance(init.kd, TrainSettings) and init.kd.steps >= 1
    for trainer in init.trainer:
        assert Path(trainer).is_file(), trainer


@pytest.mark.parametrize("path", SWEEPS, ids=str)
def test_sweep_config_resolves_every_point(path, tmp_path):
    """Every point of a shipped sweep is a valid pipeline configuration (checked by the pipeline's parser)."""
    from experiments.sweep import main as sweep

    result = sweep(["--config", str(path), "--out", str(tmp_path / "sweep"), "--dry_run", "true"])
    assert len(result["points"]) >= 3 and set(result["points"].values()) == {"dry run"}
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("path", STUDIES, ids=str)
def test_study_config_parses_into_its_settings(path):
    from experiments.layer_study import HeldoutSettings, build_parser
    from models import HybridConfig

    parser = build_parser()
    init = parser.instantiate(parser.parse_args(["--config", str(path)]))
    assert isinstance(init.hybrid, HybridConfig) and isinstance(init.heldout, HeldoutSettings)
    assert init.heldout.blocks_per_domain >= 4 and init.align.steps >= 1
