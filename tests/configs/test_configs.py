"""Every YAML under configs/ instantiates through the CLI (run=False), and opens with its command."""

from pathlib import Path

import pytest
import torch
import yaml

from experiments.run import main

CONFIGS = sorted(Path("configs").rglob("*.yaml"))
STAGES = [p for p in CONFIGS if p.parent.name == "stages"]


def test_there_are_configs_and_each_starts_with_its_command():
    assert STAGES
    for path in CONFIGS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# python -m experiments."), f"{path} must open with the command that runs it"


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_config_instantiates(path, tmp_path):
    needs_gpu = "gpu" in path.read_text() and not torch.cuda.is_available()
    if needs_gpu:
        # the Trainer refuses a GPU strategy without CUDA; check every class it names resolves
        import importlib

        text = yaml.safe_load(path.read_text())
        for name in [text["trainer"]["strategy"]["class_path"]]:
            module, _, attr = name.rpartition(".")
            assert hasattr(importlib.import_module(module), attr), name
        return
    stage = path if path in STAGES else Path("configs/stages/align.yaml")
    args = ["--config", str(stage)]
    if path != stage:
        args += ["--config", str(path)]
    if path.parent.name != "data":
        args += ["--config", "configs/data/example.yaml"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    cli = main(args, run=False)
    assert cli.model.__class__.__name__.endswith("Module")
    assert cli.datamodule is not None and cli.trainer is not None
