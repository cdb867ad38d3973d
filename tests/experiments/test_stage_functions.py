"""experiments/stages.py (named test_stage_functions: tests/lightning_modules/test_stages.py holds the
LightningModules' stages): the pipeline's stages as functions: merge weights by domain, a training
stage run as its own process from the YAML it writes, the blocks a stage reads (what the top-k
cache covers)."""

import pytest

from tests.fixtures import write_corpus, write_teacher


def test_merge_weights_are_one_per_domain_by_name_or_in_order():
    from experiments.stages import expert_weights

    domains = ["math", "code", "stem", "chat"]
    # the paper's Llama-3.1-8B-IT merge (Table 1), given by name in any order
    assert expert_weights({"chat": 0.1, "stem": 0.2, "code": 0.35, "math": 0.35}, domains) == [0.35, 0.35, 0.2, 0.1]
    assert expert_weights([1, 2, 3, 4], domains) == [1.0, 2.0, 3.0, 4.0]
    assert expert_weights(None, domains) is None and expert_weights([1.0], []) is None
    with pytest.raises(ValueError, match="not a domain: \\['poetry'\\]"):
        expert_weights({"math": 1, "code": 1, "stem": 1, "chat": 1, "poetry": 1}, domains)
    with pytest.raises(ValueError, match="positive sum"):
        expert_weights([0, 0, 0, 0], domains)


@pytest.mark.slow
def test_a_training_stage_runs_as_its_own_process(tmp_path, monkeypatch):
    """stage_process: the stage is `python -m experiments.run fit ...`, as multi-GPU launchers need."""
    from experiments.stages import TrainSettings, train_stage

    monkeypatch.setenv("XDISTILL_CACHE", str(tmp_path / "cache"))
    teacher = write_teacher(tmp_path / "teacher")
    own = write_corpus(tmp_path / "own")
    result = train_stage("align", tmp_path / "align", teacher=str(teacher), teacher_dtype="float32",
                         sources=[{"path": str(own["text"])}], seq_len=16, val_fraction=0.1, seed=0,
                         settings=TrainSettings(steps=2, batch_size=2, lr=1e-3), tensorboard=tmp_path / "tb",
                         trainer=["configs/trainer/cpu.yaml"], stage_process=True,
                         extra=("--model.init_args.hybrid.window", "8"))
    assert result["student"] == str(tmp_path / "align" / "student")
    assert (tmp_path / "align" / "student" / "model.safetensors").is_file()
    assert list((tmp_path / "tb" / "align" / "version_0").glob("events.out.tfevents*"))
    # the stage ran from the YAML it wrote, every setting spelled out; that file reruns it alone
    import yaml

    from experiments.run import main as run_main

    config = yaml.safe_load((tmp_path / "align" / "config.yaml").read_text())
    assert config["model"]["init_args"]["hybrid"]["window"] == 8 and config["trainer"]["max_steps"] == 2
    assert config["model"]["init_args"]["hybrid"]["sink_tokens"] == 4  # a default, written out
    rerun = run_main(["fit", "--config", str(tmp_path / "align" / "config.yaml"),
                      "--student_export.dirpath", str(tmp_path / "again")])
    assert rerun.trainer.global_step == 2 and (tmp_path / "again" / "model.safetensors").is_file()


def test_blocks_read_are_the_blocks_the_loader_yields_in_a_stage():
    from datamodules.loader import ResumableDataLoader
    from experiments.stages import blocks_read

    data = list(range(10))
    loader = ResumableDataLoader(data, batch_size=3, seed=7)
    seen = []
    for epoch in range(2):  # 3 whole batches an epoch; 5 steps run into the second epoch
        loader.block_sampler.set_epoch(epoch)
        seen += [int(i) for batch in loader for i in batch]
    expected = list(dict.fromkeys(seen[:5 * 3]))
    assert blocks_read(10, seed=7, batch_size=3, steps=5) == expected
    assert len(expected) < 15  # the second epoch repeats blocks, the cache keeps each once
    with pytest.raises(ValueError, match="fewer than batch_size=4"):
        blocks_read(3, seed=0, batch_size=4, steps=1)
