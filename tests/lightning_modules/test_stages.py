"""Each stage end to end through the CLI on a tiny teacher; alignment learns; resume is exact;
the top-k cache gives the online loss; bad input is refused with a clear message."""

import json
import math

import lightning as L
import pytest
import torch

from datamodules import DataSource, TextDataModule
from datamodules.topk_cache import read_topk_cache, write_topk_cache
from experiments.run import main
from lightning_modules import AlignmentModule, SparseKDModule
from lightning_modules.losses import IGNORE, cross_entropy, next_token_targets, sparse_kd_loss, teacher_topk
from models import HybridConfig, convert_to_hybrid, load_student
from tests.fixtures import stage_cli_args, write_corpus, write_teacher


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    write_teacher(root / "teacher")
    write_teacher(root / "other_teacher", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    corpus = write_corpus(root / "corpus")
    return root, corpus


def cli_args(env, stage, out, steps=3, extra=()):
    return stage_cli_args(*env, stage, out, steps, extra)


def test_align_kd_expert_chain_through_the_cli(env, tmp_path):
    main(cli_args(env, "align", tmp_path / "align"))
    aligned = load_student(tmp_path / "align" / "student")
    main(cli_args(env, "kd", tmp_path / "kd", extra=["--model.init_args.student_ckpt", str(tmp_path / "align" / "student")]))
    distilled = load_student(tmp_path / "kd" / "student")
    main(cli_args(env, "expert", tmp_path / "expert", extra=[
        "--model.init_args.student_ckpt", str(tmp_path / "kd" / "student"), "--model.init_args.domain", "chat"]))
    expert = load_student(tmp_path / "expert" / "student")
    ids = torch.randint(5, 90, (1, 12))
    with torch.no_grad():
        logits = [m(ids).logits for m in (aligned, distilled, expert)]
    assert not torch.equal(logits[0], logits[1]) and not torch.equal(logits[1], logits[2])
    assert (tmp_path / "kd" / "kd" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    # losses, schedules, learning rate, gradient norm and throughput reach TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(stage):
        events = EventAccumulator(str(next((tmp_path / stage).rglob("events.out.tfevents*")).parent))
        events.Reload()
        return events, set(events.Tags()["scalars"])

    events, tags = scalars("kd")
    assert {"train/kd", "train/ce", "train/loss", "train/kd_temperature", "train/kd_alpha", "train/grad_norm",
            "train/tokens_per_s", "lr-AdamW", "val/student_ce", "val/teacher_ce", "val/kl_teacher_student",
            "val/top1_agreement", "val/student_ppl"} <= tags, tags
    # every training stage logs the mean mix gate o of each hybrid layer (is the memory used?)
    gate_tags = {"gate/mean_o", "gate/mean_o_layer_00", "gate/mean_o_layer_01"}
    for stage in ("align", "kd", "expert"):
        events, tags = scalars(stage)
        assert gate_tags <= tags, (stage, tags)
        values = [e.value for e in events.Scalars("gate/mean_o_layer_00")]
        assert len(values) == 3 and all(0.0 < v < 1.0 for v in values), (stage, values)
    # it is the layers' actual gate: at conversion every head's o is sigmoid(mix_gate_bias_init)
    first = scalars("align")[0].Scalars("gate/mean_o")[0].value
    assert abs(first - torch.sigmoid(torch.tensor(HybridConfig().mix_gate_bias_init)).item()) < 1e-6


def test_kd_with_lora_saves_a_merged_student(env, tmp_path):
    main(cli_args(env, "kd", tmp_path, extra=["--model.init_args.lora_rank", "2", "--model.init_args.trainable", "new",
                                              "--model.init_args.lr", "1e-2"]))
    student = load_student(tmp_path / "student")
    assert not any("lora" in n for n, _ in student.named_parameters())


def test_merge_lora_keeps_the_adapters_effect():
    """Folding the adapters into their base weights changes no logit: the merged plain student
    computes what the adapted one did (and the adapters did change it)."""
    from peft import LoraConfig, inject_adapter_in_model

    from lightning_modules.kd import merge_lora
    from tests.conftest import make_teacher

    student = convert_to_hybrid(make_teacher("llama"), HybridConfig(window=8)).eval()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = student(ids).logits
    # init_lora_weights=False: random A and B, so the adapters change the output from the first step
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    inject_adapter_in_model(config, student.lm)
    with torch.no_grad():
        adapted = student(ids).logits
        merged = merge_lora(student)(ids).logits
    assert (adapted - plain).abs().max() > 1e-3
    assert not any("lora" in name for name, _ in student.named_parameters())
    assert torch.allclose(merged, adapted, rtol=1e-5, atol=1e-5), (merged - adapted).abs().max()


def tiny_dm(env, **kw):
    root, corpus = env
    return TextDataModule(tokenizer=str(root / "teacher"), sources=[DataSource(str(corpus["text"]))], seq_len=32,
                          batch_size=4, cache_dir=str(root / "cache"), **kw)


def test_alignment_mse_halves_within_30_steps(env):
    root, _ = env
    dm = tiny_dm(env)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = AlignmentModule(teacher=str(root / "teacher"), lr=3e-2, warmup_steps=0)
    module.configure_model()
    losses = _train(module, batch, steps=30, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0]


def test_swa_only_student_aligns_its_attention_and_refuses_new(env):
    """With mode='swa' the gates and norms are dead weight: 'new' is refused by name, 'attention' trains."""
    root, _ = env
    swa = HybridConfig(mode="swa", window=4, sink_tokens=1, chunk_size=8)
    with pytest.raises(ValueError, match="trainable='new' trains nothing when hybrid.mode='swa'.*'attention'"):
        AlignmentModule(teacher=str(root / "teacher"), hybrid=swa, trainable="new").configure_model()
    dm = tiny_dm(env)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = AlignmentModule(teacher=str(root / "teacher"), hybrid=swa, trainable="attention")
    module.configure_model()
    trained = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert trained and all(".self_attn." in n for n in trained)
    losses = _train(module, batch, steps=10, lr=1e-2)
    assert losses[-1] < losses[0]


def _train(module, batch, steps, lr):
    """Alignment losses over ``steps`` Adam steps on one batch."""
    opt = torch.optim.Adam(module.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = _align_loss(module, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _align_loss(module, batch):
    module.log = lambda *a, **k: None  # training_step outside a Trainer: no logging
    return module.training_step(batch, 0)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


class StopAt(L.Callback):
    """Ends a run after ``step`` optimizer steps, as an interruption would (same max_steps, so the
    learning-rate schedule of the resumed run is the straight run's)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(env, out, steps, ckpt_path=None, stop_at=None):
    root, _ = env
    L.seed_everything(0)
    recorder = LossRecorder()
    module = SparseKDModule(teacher=str(root / "teacher"), lr=1e-2, top_k=8)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(out), limit_val_batches=0,
                        callbacks=[recorder, L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out), save_last=True,
                                                                                 every_n_train_steps=1),
                                   *([StopAt(stop_at)] if stop_at else [])])
    trainer.fit(module, datamodule=tiny_dm(env), ckpt_path=ckpt_path)
    return recorder.losses


def test_resume_continues_with_the_same_losses(env, tmp_path):
    straight = _fit(env, tmp_path / "a", steps=6)
    _fit(env, tmp_path / "b", steps=6, stop_at=3)
    resumed = _fit(env, tmp_path / "b", steps=6, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6)


class GradientsAtBatchStart(L.Callback):
    """Whether the student holds any gradient when each batch starts (before its forward)."""

    def __init__(self):
        self.held = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.held.append(any(p.grad is not None for p in pl_module.trainable_parameters()))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_released_after_each_optimizer_step(env, tmp_path, accumulate):
    # Lightning zeroes gradients only after the next forward: without the release, the last step's
    # gradients would sit through every forward. Within an accumulation window they must stay.
    root, _ = env
    L.seed_everything(0)
    seen = GradientsAtBatchStart()
    module = SparseKDModule(teacher=str(root / "teacher"), lr=1e-2, top_k=8)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=0,
                        enable_checkpointing=False, accumulate_grad_batches=accumulate, callbacks=[seen])
    trainer.fit(module, datamodule=tiny_dm(env))
    assert seen.held == ([False] * 3 if accumulate == 1 else [False, True] * 3)


def cached_blocks(env, folder, k, blocks, **kwargs):
    """A KD module, its datamodule, and a top-k cache of the first ``blocks`` training blocks."""
    root, _ = env
    dm = tiny_dm(env)
    dm.setup("fit")
    module = SparseKDModule(teacher=str(root / "teacher"), top_k=k)
    module.configure_model()
    train = dm.train_set.tensors
    write_topk_cache(module.teacher, dm.tokenizer, train["input_ids"][:blocks], train["labels"][:blocks], k, folder,
                     **kwargs)
    return dm, module


def test_topk_cache_loss_equals_online_loss(env, tmp_path):
    dm, module = cached_blocks(env, tmp_path / "c", k=8, blocks=8, shard_blocks=3)
    cached = read_topk_cache(tmp_path / "c", tokenizer=dm.tokenizer, teacher=module.teacher)
    assert cached["topk_ids"].shape == (8, 32, 8)
    ids = cached["input_ids"]
    targets = next_token_targets(cached["labels"])
    with torch.no_grad():
        s_logits = module.student(ids).logits
        online = sparse_kd_loss(s_logits, *teacher_topk(module.teacher(ids).logits, 8), 2.0, targets != IGNORE)
        from_cache = sparse_kd_loss(s_logits, cached["topk_ids"], cached["topk_logprobs"], 2.0, targets != IGNORE)
    assert from_cache.item() == pytest.approx(online.item(), rel=1e-6)
    # the datamodule serves the cache's blocks and top-k
    dm_cache = tiny_dm(env, topk_cache=str(tmp_path / "c"))
    dm_cache.setup("fit")
    assert set(next(iter(dm_cache.train_dataloader()))) >= {"input_ids", "labels", "topk_ids", "topk_logprobs"}


def test_a_damaged_topk_shard_is_refused_by_name_and_a_rerun_rebuilds_only_it(env, tmp_path):
    import json
    import warnings

    dm, module = cached_blocks(env, tmp_path / "c", k=4, blocks=6, shard_blocks=2)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert set(manifest["files"]) == set(manifest["shards"]) == {f"shard-0000{i}.safetensors" for i in range(3)}
    before = read_topk_cache(tmp_path / "c", tokenizer=dm.tokenizer)
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100:] = bytes(100)  # log-probabilities zeroed: a valid file that trains on wrong targets
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"top-k cache: .*shard-00001.safetensors does not match .*manifest.json: "
                                         r"its SHA-256.*rerun the command that built the cache"):
        read_topk_cache(tmp_path / "c", tokenizer=dm.tokenizer)
    untouched = {name: (tmp_path / "c" / name).stat().st_mtime_ns for name in ("shard-00000.safetensors",
                                                                               "shard-00002.safetensors")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = dm.train_set.tensors
        write_topk_cache(module.teacher, dm.tokenizer, train["input_ids"][:6], train["labels"][:6], 4, tmp_path / "c",
                         shard_blocks=2)
    assert any("rebuilding shard-00001.safetensors" in str(w.message) for w in caught)
    assert untouched == {name: (tmp_path / "c" / name).stat().st_mtime_ns for name in untouched}
    after = read_topk_cache(tmp_path / "c", tokenizer=dm.tokenizer)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_cache_for_another_tokenizer_is_refused(env, tmp_path):
    root, _ = env
    dm, _ = cached_blocks(env, tmp_path / "c", k=4, blocks=2)
    other = dm.tokenizer.__class__.from_pretrained(str(root / "teacher"))
    other.add_tokens(["brand-new-token"])
    with pytest.raises(ValueError, match="another tokenizer"):
        read_topk_cache(tmp_path / "c", tokenizer=other)


def test_unknown_config_key_is_named(env, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(cli_args(env, "align", tmp_path, extra=["--model.init_args.windoww", "3"]))
    assert "windoww" in capsys.readouterr().err


def test_missing_dataset_path_is_named(env, tmp_path):
    args = cli_args(env, "align", tmp_path)
    args[args.index("--data.sources") + 1] = json.dumps([{"path": str(tmp_path / "missing.jsonl")}])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        main(args)


def test_student_of_another_teacher_is_refused(env, tmp_path):
    root, _ = env
    main(cli_args(env, "align", tmp_path / "a", steps=1, extra=["--model.init_args.teacher", str(root / "other_teacher")]))
    with pytest.raises(ValueError, match="another teacher"):
        main(cli_args(env, "kd", tmp_path / "b", extra=["--model.init_args.student_ckpt", str(tmp_path / "a" / "student")]))


def test_top_k_larger_than_vocabulary_is_refused(env, tmp_path):
    with pytest.raises(ValueError, match="top_k"):
        main(cli_args(env, "kd", tmp_path, extra=["--model.init_args.preset", "null", "--model.init_args.top_k", "1000"]))


def test_topk_cache_command_then_kd_trains_from_it(env, tmp_path):
    from experiments.topk_cache import main as build_cache

    root, corpus = env
    sources = json.dumps([{"path": str(corpus["text"])}])
    common = ["--data.sources", sources, "--data.seq_len", "32", "--data.cache_dir", str(root / "cache")]
    build_cache(["--teacher", str(root / "teacher"), "--k", "8", "--out", str(tmp_path / "cache"), "--shard_blocks", "10",
                 *common])
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) > 1
    args = cli_args(env, "kd", tmp_path / "run", extra=["--data.topk_cache", str(tmp_path / "cache"),
                                                         "--model.init_args.preset", "null", "--model.init_args.top_k", "8"])
    args[args.index("--data.sources") + 1] = sources
    main(args)
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


def test_cache_of_another_teacher_is_refused_at_fit_start(env, tmp_path):
    from experiments.topk_cache import main as build_cache

    root, corpus = env
    sources = json.dumps([{"path": str(corpus["text"])}])
    build_cache(["--teacher", str(root / "teacher"), "--k", "4", "--out", str(tmp_path / "cache"),
                 "--data.sources", sources, "--data.seq_len", "32", "--data.cache_dir", str(root / "cache")])
    # same tokenizer, different weights
    write_teacher(tmp_path / "retrained", seed=7)
    args = cli_args(env, "kd", tmp_path / "run", extra=["--data.topk_cache", str(tmp_path / "cache"),
                                                         "--model.init_args.teacher", str(tmp_path / "retrained"),
                                                         "--model.init_args.preset", "null", "--model.init_args.top_k", "4"])
    args[args.index("--data.sources") + 1] = sources
    with pytest.raises(ValueError, match="another teacher"):
        main(args)


def test_validate_and_test_subcommands_score_a_saved_student(env, tmp_path):
    main(cli_args(env, "align", tmp_path / "a", steps=1))
    for sub in ("validate", "test"):
        args = cli_args(env, "kd", tmp_path / sub, extra=["--model.init_args.student_ckpt", str(tmp_path / "a" / "student")])
        args[0] = sub
        drop = {"--trainer.max_steps", "--trainer.val_check_interval", "--student_export.dirpath"}
        args = [a for i, a in enumerate(args) if a not in drop and (i == 0 or args[i - 1] not in drop)]
        cli = main(args)
        metrics = cli.trainer.callback_metrics
        assert {f"{sub if sub == 'test' else 'val'}/student_ce", f"{sub if sub == 'test' else 'val'}/top1_agreement"} <= set(metrics)


def test_kd_presets_set_the_recipe_and_refuse_a_conflicting_setting(env):
    from lightning_modules.schedules import Schedule

    root, _ = env
    teacher = str(root / "teacher")
    paper = SparseKDModule(teacher=teacher, preset="paper")
    hp = paper.hparams
    assert (hp.top_k, hp.kd_tail, hp.lr_schedule) == (256, "renormalised", "constant")
    assert paper.schedules["temperature"] == Schedule("constant", 1.0)
    assert paper.schedules["alpha"] == Schedule("constant", 0.1)  # 0.9 CE + 0.1 KL
    paper.configure_model()
    assert paper.top_k == 97  # the tiny teacher's whole vocabulary is its top-256
    # hparams keep the recipe, so a checkpoint's hparams rebuild the module (LightningCLI resumes that way)
    assert paper.hparams.top_k == 256
    assert SparseKDModule(**paper.hparams).hparams == paper.hparams
    delta = SparseKDModule(teacher=teacher, preset="distil_xlstm")
    assert delta.schedules["temperature"] == Schedule("delta", 2.0, 1.0, delta=0.05)
    assert delta.schedules["alpha"] == Schedule("delta", 0.8, 0.5, delta=0.05) and delta.hparams.top_k == 64
    # the preset's own value may be repeated; another value is refused, naming both
    assert SparseKDModule(teacher=teacher, preset="paper", top_k=256).hparams.top_k == 256
    with pytest.raises(ValueError, match=r"model.preset='paper' sets top_k=256, but top_k=8 was given"):
        SparseKDModule(teacher=teacher, preset="paper", top_k=8)
    with pytest.raises(ValueError, match=r"sets alpha=.*but alpha=.*start=0.7"):
        SparseKDModule(teacher=teacher, preset="paper", alpha={"kind": "constant", "start": 0.7})
    with pytest.raises(ValueError, match=r"preset='gkd' is not supported; allowed values: paper, distil_xlstm"):
        SparseKDModule(teacher=teacher, preset="gkd")


class LearningRates(L.Callback):
    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("preset, expected", [
    ("paper", [1e-2] * 5),  # constant after a warm-up capped to int(0.1 * 5) = 0 steps
    (None, [1e-2, 1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 5)))]),  # cosine starts at the peak
])
def test_a_short_stage_trains_at_its_peak_learning_rate(env, tmp_path, preset, expected):
    root, _ = env
    rates = LearningRates()
    module = SparseKDModule(teacher=str(root / "teacher"), lr=1e-2, warmup_steps=10, preset=preset,
                            **({} if preset else {"top_k": 8}))
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        limit_val_batches=0, callbacks=[rates])
    trainer.fit(module, datamodule=tiny_dm(env))
    assert rates.rates[:len(expected)] == pytest.approx(expected, rel=1e-9)
    assert max(rates.rates) == pytest.approx(1e-2)


def test_a_cache_of_a_larger_k_serves_a_smaller_top_k(env, tmp_path):
    dm, module = cached_blocks(env, tmp_path / "c", k=8, blocks=4)
    cached = read_topk_cache(tmp_path / "c", tokenizer=dm.tokenizer, teacher=module.teacher)
    small = SparseKDModule(teacher=str(env[0] / "teacher"), top_k=3, temperature={"kind": "constant", "start": 1.0})
    small.configure_model()
    small.student.load_state_dict(module.student.state_dict())
    small.log = lambda *a, **k: None
    small.log_dict = lambda *a, **k: None
    batch = {k: cached[k] for k in ("input_ids", "labels", "topk_ids", "topk_logprobs")}
    with torch.no_grad():
        from_cache = small.training_step(batch, 0)
        ids = cached["input_ids"]
        targets = next_token_targets(cached["labels"])
        logits = small.student(ids).logits
        online = 0.5 * sparse_kd_loss(logits, *teacher_topk(small.teacher(ids).logits, 3), 1.0, targets != IGNORE) \
            + 0.5 * cross_entropy(logits, targets)
    assert from_cache.item() == pytest.approx(online.item(), rel=1e-6)


def test_an_expert_trains_with_the_recipe_its_preset_resolved(env):
    """LightningCLI passes every argument, defaults included: the preset's values must still be the
    ones the expert records and trains with (top_k, kd_tail, lr_schedule)."""
    import inspect

    from lightning_modules import ExpertFinetuneModule

    root, _ = env
    defaults = {k: v.default for k, v in inspect.signature(SparseKDModule.__init__).parameters.items()
                if k not in ("self", "student_ckpt", "teacher", "preset")}
    expert = ExpertFinetuneModule(domain="math", student_ckpt="runs/kd/student", teacher=str(root / "teacher"),
                                  preset="paper", **defaults)
    hp = expert.hparams
    assert (hp.domain, hp.top_k, hp.kd_tail, hp.lr_schedule, hp.preset) == ("math", 256, "renormalised", "constant", "paper")
    assert hp.alpha["start"] == 0.1 and hp.temperature["start"] == 1.0
    assert dict(expert.hparams_initial) == dict(hp)  # what hparams.yaml and TensorBoard record


@pytest.mark.parametrize("setting", [dict(top_k=8), dict(top_k=None), dict(top_k=8, kd_tail="renormalised"),
                                     dict(top_k=8, beta={"kind": "constant", "start": 0.2}), "cached"])
def test_kd_step_in_chunks_with_recomputed_activations_equals_the_plain_step(env, tmp_path, setting):
    """The memory plan changes what is kept, not what is computed: the loss and every gradient of
    the lean step (loss over the vocabulary in chunks of 5 positions, recomputed hybrid op and MLP
    product) equal those of the plain step, for sparse, dense, renormalised, Frobenius and cached KD."""
    root, _ = env
    dm = tiny_dm(env)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    kwargs = dict(top_k=8) if setting == "cached" else setting
    if setting == "cached":
        _, module = cached_blocks(env, tmp_path / "c", k=8, blocks=4)
        cached = read_topk_cache(tmp_path / "c", tokenizer=dm.tokenizer, teacher=module.teacher)
        batch = {k: cached[k] for k in ("input_ids", "labels", "topk_ids", "topk_logprobs")}
    results = []
    for lean in (False, True):
        torch.manual_seed(0)
        module = SparseKDModule(teacher=str(root / "teacher"), trainable="all", loss_chunk_tokens=5 if lean else None,
                                recompute_activations=lean, **kwargs)
        module.configure_model()
        layers = module.student.lm.model.layers
        assert all(layer.self_attn.recompute_in_backward == lean for layer in layers)
        assert all((type(layer.mlp).__name__ == "LeanGatedMLP") == lean for layer in layers)
        module.log = module.log_dict = lambda *a, **k: None
        loss = module.training_step(batch, 0)
        grads = torch.autograd.grad(loss, [p for p in module.student.parameters() if p.requires_grad])
        results.append((loss.detach(), grads))
    (plain_loss, plain_grads), (lean_loss, lean_grads) = results
    assert lean_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    for g, e in zip(lean_grads, plain_grads):
        assert ((g - e).norm() / e.norm().clamp_min(1e-30)).item() < 1e-4


def test_loss_chunk_tokens_below_one_is_refused(env):
    with pytest.raises(ValueError, match="loss_chunk_tokens=0 is invalid"):
        SparseKDModule(teacher=str(env[0] / "teacher"), loss_chunk_tokens=0)


@pytest.mark.parametrize("layer_loss", ["sum", "mean"])
def test_layer_by_layer_alignment_gives_the_all_at_once_loss_and_gradients(env, layer_loss):
    """The lean plan's alignment (each layer's forward and backward in turn, gradients handed over in
    the backward, scaled by the incoming gradient) against the plain all-at-once loss."""
    root, _ = env
    dm = tiny_dm(env)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    results = []
    for lean in (False, True):
        torch.manual_seed(0)
        module = AlignmentModule(teacher=str(root / "teacher"), layer_loss=layer_loss, recompute_activations=lean)
        module.configure_model()
        module.log = module.log_dict = lambda *a, **k: None
        assert module.layer_by_layer is lean
        assert not any(module.student.lm.model.layers[i].self_attn.recompute_in_backward for i in module.hybrid_layers())
        loss = module.training_step(batch, 0)
        params = [p for p in module.student.parameters() if p.requires_grad]
        results.append((loss.detach(), torch.autograd.grad(3.0 * loss, params, allow_unused=True)))
        if lean:
            with pytest.raises(RuntimeError, match="retain_graph"):
                torch.autograd.grad(loss, params)
    (plain_loss, plain_grads), (lean_loss, lean_grads) = results
    assert lean_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    assert sum(g is not None for g in plain_grads) > 0
    for g, e in zip(lean_grads, plain_grads):
        assert (g is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_a_stage_runs_a_loaded_students_op_on_the_backend_it_is_given(env, tmp_path):
    """The op's backend is how the layers run, not what they compute: a stage that loads a saved
    student applies ``hybrid.backend`` to it (``compiled`` for training at a fixed length) instead
    of refusing it as an ignored layer setting."""
    from models import HybridAttention, load_teacher, save_student

    root, _ = env
    saved = save_student(convert_to_hybrid(load_teacher(str(root / "teacher")), HybridConfig(window=16)),
                         tmp_path / "saved")
    module = SparseKDModule(teacher=str(root / "teacher"), student_ckpt=str(saved),
                            hybrid=HybridConfig(backend="compiled"))
    module.configure_model()
    layers = [m for m in module.student.modules() if isinstance(m, HybridAttention)]
    assert layers and all(m.cfg.backend == "compiled" for m in layers)
    assert module.student.hybrid_config.backend == "compiled" and module.student.hybrid_config.window == 16
    with pytest.raises(ValueError, match="backend='fused' is not supported"):
        module.student.use_op_backend("fused")
