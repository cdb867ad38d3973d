"""The training entry point under faults: a fit killed mid-epoch resumes to the very weights of an
uninterrupted run; NaN losses stop the run keeping the last good checkpoint; a full disk during a
checkpoint write keeps the previous checkpoint; bad configurations, unwritable folders, missing
space and corrupt checkpoints are refused before any model loads, naming the key or the file."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.run import main
from lightning_modules import NonFiniteLossError
from tests.fixtures import stage_cli_args, write_corpus, write_teacher

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    write_teacher(root / "teacher")
    corpus = write_corpus(root / "corpus")
    return root, corpus


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a teacher or student is loaded: the refusals must come before."""
    import lightning_modules.base as base

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was refused")

    monkeypatch.setattr(base, "load_teacher", refuse)
    monkeypatch.setattr(base, "load_student", refuse)


def checkpointed(env, stage, out, steps, every, extra=()):
    """Stage arguments that checkpoint every ``every`` steps into ``out``/ckpt (the CLI's defaults:
    last.ckpt only), validating only after the last step."""
    return stage_cli_args(*env, stage, out, steps, [
        "--checkpoint.every_n_train_steps", str(every), "--checkpoint.dirpath", str(out / "ckpt"), *extra])


def run_cli(args, env_root):
    env = {**os.environ, "XDISTILL_CACHE": str(env_root / "xcache"), "PYTHONPATH": str(PROJECT)}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=600)


def callback(name, **init_args):
    return json.dumps([{"class_path": f"tests.crash_callbacks.{name}", "init_args": init_args}])


@pytest.mark.slow
def test_fit_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_fit(env, tmp_path):
    root, _ = env
    steps, every = 10, 3  # an epoch of this corpus is ~40 batches: the kill is mid-epoch
    straight = run_cli(checkpointed(env, "kd", tmp_path / "straight", steps, every), root)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "killed"
    same_command = checkpointed(env, "kd", run, steps, every, ["--ckpt_path", "last"])
    killed = run_cli(same_command + ["--trainer.callbacks", callback("KillAtStep", step=7)], root)
    assert killed.returncode == -signal.SIGKILL
    assert "no checkpoint of this run yet, starting from the beginning" in killed.stdout
    saved = torch.load(run / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 6 and saved["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 0
    assert not (run / "student").exists()

    resumed = run_cli(same_command, root)  # the very same command, after the "preemption"
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run / 'ckpt' / 'last.ckpt'}" in resumed.stdout
    a = load_file(str(tmp_path / "straight" / "student" / "model.safetensors"))
    b = load_file(str(run / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.load(run / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 9  # it went on checkpointing


def test_last_resumes_in_the_logger_version_of_the_previous_attempt(env, tmp_path, capsys):
    args = stage_cli_args(*env, "align", tmp_path, 2, ["--checkpoint.every_n_train_steps", "2", "--ckpt_path", "last"])
    main(args)
    assert "starting from the beginning" in capsys.readouterr().out
    first = tmp_path / "align" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(first, weights_only=True)["global_step"] == 2
    args[args.index("--trainer.max_steps") + 1] = "4"
    cli = main(args)
    assert f"resuming from {first} (logger version version_0)" in capsys.readouterr().out
    assert cli.trainer.global_step == 4
    assert torch.load(first, weights_only=True)["global_step"] == 4
    assert not (tmp_path / "align" / "version_1").exists()  # the logs continue in the same folder


def test_nan_loss_stops_naming_step_and_component_and_keeps_the_last_good_checkpoint(env, tmp_path):
    out = tmp_path / "nan"
    args = checkpointed(env, "kd", out, 10, 2, ["--trainer.callbacks", callback("PoisonWeightsAtStep", step=5)])
    with pytest.raises(NonFiniteLossError, match=r"step 5 \(epoch 0, batch 5\): loss component kd=nan, ce=nan"):
        main(args)
    # written between validations (validation runs only after step 10): Lightning defers step-interval
    # checkpoints that monitor a validation metric, so the CLI's default monitors none
    saved = torch.load(out / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    assert not (out / "student").exists()  # a poisoned student is never exported


def test_nan_alignment_loss_names_the_layer(env, tmp_path):
    args = checkpointed(env, "align", tmp_path, 4, 2, ["--trainer.callbacks", callback("PoisonWeightsAtStep", step=1)])
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*alignment_mse_layer_0=nan.*alignment_mse=nan"):
        main(args)


def test_non_finite_gradient_is_named(env):
    from lightning_modules import AlignmentModule

    root, _ = env
    module = AlignmentModule(teacher=str(root / "teacher"))
    module.configure_model()
    named = [(n, p) for n, p in module.student.named_parameters() if p.requires_grad]
    for _, p in named:
        p.grad = torch.zeros_like(p)
    named[3][1].grad[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=f"gradient of {named[3][0]} is not finite"):
        module.on_before_optimizer_step(None)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_so(env, tmp_path):
    root, _ = env
    out = tmp_path / "full"
    limit = callback("LimitFileSizeAtStep", step=3, max_bytes=64 * 1024)  # far below one checkpoint
    failed = run_cli(checkpointed(env, "kd", out, 10, 2, ["--trainer.callbacks", limit]), root)
    assert failed.returncode != 0
    assert f"could not write checkpoint {out / 'ckpt' / 'last.ckpt'} (" in failed.stderr
    assert "Nothing was half-written" in failed.stderr and "are intact (last.ckpt)" in failed.stderr
    assert "--ckpt_path last" in failed.stderr
    assert torch.load(out / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
    # no half-written leftovers; the kept checkpoint still matches the manifest saved with it
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["last.ckpt", "last.ckpt.sha256.json"]
    from models.storage import verify_file

    assert verify_file(out / "ckpt" / "last.ckpt", "", required=True)


def test_unwritable_output_folder_is_refused_before_training(env, tmp_path, monkeypatch):
    import lightning_modules.base as base

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    trained = []
    monkeypatch.setattr(base.DistillationModule, "configure_optimizers",
                        lambda self: trained.append(1) or (_ for _ in ()).throw(AssertionError("training started")))
    args = stage_cli_args(*env, "align", tmp_path, 2, ["--checkpoint.dirpath", str(blocker / "ckpt")])
    with pytest.raises(OSError, match=rf"cannot write to {blocker / 'ckpt'} \(checkpoint.dirpath\).*"
                                      r"Nothing has been trained yet; choose a writable folder with --checkpoint.dirpath"):
        main(args)
    assert not trained


def test_read_only_folder_is_detected(tmp_path):
    """A read-only folder: without write permission for an unprivileged user; for root (who writes
    anywhere) a read-only tmpfs mounted in a private mount namespace."""
    import shutil

    from models.storage import unwritable_reason

    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        assert f"permission denied: {folder} is not writable by this user" in unwritable_reason(folder)
        return
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare(1): no way to make a read-only folder")
    code = f"from models.storage import unwritable_reason; print(unwritable_reason({str(folder)!r}))"
    script = f"mount -t tmpfs -o ro tmpfs {folder} && {sys.executable} -c {code!r}"
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=PROJECT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)})
    if "mount:" in done.stderr or "unshare:" in done.stderr:
        pytest.skip(f"no private read-only mount possible here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{folder} is on a read-only file system (choose a folder on a writable disk)" in done.stdout


def test_too_little_free_space_is_refused_before_the_first_step(env, tmp_path, monkeypatch):
    import shutil

    import callbacks.safeguards as safeguards

    monkeypatch.setattr(safeguards.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5))
    args = checkpointed(env, "kd", tmp_path, 4, 1)
    with pytest.raises(OSError, match=rf"not enough free space in {tmp_path}.*: this fit keeps about [\d.]+ MiB .*"
                                      r"only 0.1 MiB are free. Nothing has been trained yet"):
        main(args)
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())


def test_checkpoint_size_estimate_counts_weights_and_adam_moments():
    from callbacks.safeguards import checkpoint_bytes

    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 5, bias=False))
    model[1].requires_grad_(False)
    assert checkpoint_bytes(model) == (110 + 50) * 4 + 2 * 110 * 4


# ---- refused before any model loads ------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--model.init_args.hybrid.window", "32"],
     r"model.init_args.hybrid.window=32 is not smaller than data.seq_len=32 while hybrid.sink_tokens=4.*"
     r"Allowed values: window < 32"),
    (["--model.init_args.preset", "null", "--model.init_args.top_k", "1000"],
     r"model.init_args.top_k=1000 is larger than the teacher's vocabulary \(97\); allowed values: 1..97"),
    (["--trainer.strategy", "fsdp"], r"trainer.strategy='fsdp'.*needs CUDA GPUs.*configs/trainer/fsdp-cpu.yaml"),
    (["--trainer.strategy", '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}',
      "--trainer.devices", "1"],
     r"shards over one process.*allowed values: trainer.devices >= 2"),
    (["--model.init_args.student_ckpt", "/nonexistent/student"],
     r"student folder /nonexistent/student does not exist"),
])
def test_impossible_combinations_are_refused_before_any_model_loads(env, tmp_path, no_model_loads, extra, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        main(stage_cli_args(*env, "kd", tmp_path, 2, extra))


def test_a_student_setting_the_stage_would_ignore_is_refused_naming_both_values(env, tmp_path, monkeypatch):
    """With model.student_ckpt the stage trains the saved student as it is: a hybrid setting given
    beside it that differs from the saved one would be silently ignored, so it is refused."""
    import lightning_modules.base as base
    from models import HybridConfig, convert_to_hybrid, load_teacher, save_student

    root, _ = env
    saved = save_student(convert_to_hybrid(load_teacher(str(root / "teacher")), HybridConfig(window=16)),
                         tmp_path / "saved")
    loaded = []
    monkeypatch.setattr(base, "load_teacher", lambda *a, **k: loaded.append("teacher"))
    ckpt = ["--model.init_args.student_ckpt", str(saved)]
    with pytest.raises(ValueError, match=r"model.init_args.hybrid sets mode='swa' \(saved: 'hybrid'\), window=8 "
                                         r"\(saved: 16\), but the stage trains the student saved in .*saved"):
        main(stage_cli_args(*env, "kd", tmp_path, 2, [*ckpt, "--model.init_args.hybrid.window", "8",
                                                      "--model.init_args.hybrid.mode", "swa"]))
    with pytest.raises(ValueError, match=r"student_family='distil_xlstm' but .*saved holds a 'hybrid' student"):
        main(stage_cli_args(*env, "kd", tmp_path, 2, [*ckpt, "--model.init_args.student_family", "distil_xlstm"]))
    assert loaded == []  # refused before any model loads
    # the saved value repeated, or the default, is no conflict
    from experiments.run import check_stage_config
    from jsonargparse import Namespace

    cfg = Namespace(model=Namespace(class_path="lightning_modules.SparseKDModule",
                                    init_args=Namespace(student_ckpt=str(saved), hybrid={"window": 16})),
                    data=Namespace(seq_len=32), trainer=Namespace(strategy="auto", accelerator="cpu"))
    check_stage_config(cfg)
    cfg.model.init_args.hybrid = HybridConfig().to_dict()
    check_stage_config(cfg)
    # and a Python user who builds the module by hand gets the same refusal when the student loads
    from lightning_modules import SparseKDModule

    module = SparseKDModule(teacher=str(root / "teacher"), student_ckpt=str(saved), hybrid={"window": 8})
    with pytest.raises(ValueError, match=r"window=8 \(saved: 16\)"):
        module.configure_model()


def test_window_covering_the_whole_block_is_fine_without_sinks_and_for_scoring(env, tmp_path):
    from experiments.run import check_stage_config
    from jsonargparse import Namespace

    cfg = Namespace(model=Namespace(class_path="lightning_modules.AlignmentModule",
                                    init_args=Namespace(hybrid={"window": 64, "sink_tokens": 0})),
                    data=Namespace(seq_len=32), trainer=Namespace(strategy="auto", accelerator="cpu"))
    check_stage_config(cfg)
    cfg.model.init_args.hybrid["sink_tokens"] = 4
    check_stage_config(cfg, training=False)
    with pytest.raises(ValueError, match="window=64"):
        check_stage_config(cfg)


@pytest.mark.parametrize("extra, names", [
    (["--model.init_args.lr", "fast"], ['key "lr"', "float", "fast"]),
    (["--trainer.max_steps", "ten"], ["trainer.max_steps", "ten"]),
    (["--model.init_args.hybrid.mode", "lstm"], ["mode='lstm'", "allowed values: hybrid, mlstm, swa"]),
    (["--data.seq_len", "1"], ["seq_len=1", "allowed values: >= 2"]),
    (["--model.init_args.windw", "3"], ["windw"]),
])
def test_wrong_types_and_values_are_refused_naming_the_key(env, tmp_path, no_model_loads, capsys, extra, names):
    with pytest.raises((SystemExit, ValueError)) as err:
        main(stage_cli_args(*env, "kd", tmp_path, 2, extra))
    text = capsys.readouterr().err + str(err.value)
    for name in names:
        assert name in text, text[-2000:]


def test_truncated_checkpoint_is_refused_by_name_before_any_model_loads(env, tmp_path, no_model_loads):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1500])
    with pytest.raises(ValueError, match=rf"checkpoint {ckpt} is truncated or not a torch checkpoint"):
        main(stage_cli_args(*env, "kd", tmp_path, 2, ["--ckpt_path", str(ckpt)]))
    with pytest.raises(FileNotFoundError, match=rf"checkpoint {tmp_path / 'gone.ckpt'} does not exist"):
        main(stage_cli_args(*env, "kd", tmp_path, 2, ["--ckpt_path", str(tmp_path / "gone.ckpt")]))


class NotATensor:
    pass


def lightning_like(**extra):
    """The keys a Lightning checkpoint always has, and a tensor big enough to damage in the middle."""
    return {"pytorch-lightning_version": "2.6.0", "state_dict": {"w": torch.arange(40_000, dtype=torch.float32)},
            "global_step": 4, **extra}


def test_checkpoints_load_only_with_weights_only(tmp_path):
    from callbacks.safeguards import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    io.save_checkpoint(lightning_like(), tmp_path / "good.ckpt")
    assert io.load_checkpoint(tmp_path / "good.ckpt", weights_only=False)["global_step"] == 4
    torch.save(lightning_like(payload=NotATensor()), tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match=rf"checkpoint {tmp_path / 'pickled.ckpt'} holds pickled Python objects"):
        io.load_checkpoint(tmp_path / "pickled.ckpt", weights_only=False)  # the caller cannot turn it off


def _zero_the_middle(path, nbytes=10_000):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + nbytes] = bytes(nbytes)
    path.write_bytes(bytes(data))


def test_a_saved_checkpoint_carries_a_manifest_and_damaged_bytes_are_refused(tmp_path):
    """Torch does not check a zip member's CRC: 10 KB zeroed in the middle of a checkpoint used to
    resume with zeroed optimizer moments. The manifest names it; a checkpoint saved without one
    (by an older xdistill or another tool) is caught by the CRCs."""
    from callbacks.safeguards import AtomicCheckpointIO, check_checkpoint_file

    io = AtomicCheckpointIO()
    ckpt = tmp_path / "last.ckpt"
    io.save_checkpoint(lightning_like(), ckpt)
    sidecar = json.loads((tmp_path / "last.ckpt.sha256.json").read_text())
    assert sidecar["files"]["last.ckpt"]["bytes"] == ckpt.stat().st_size
    torch.load(ckpt, weights_only=True)  # what torch alone would do after the damage: nothing
    _zero_the_middle(ckpt)
    assert torch.load(ckpt, weights_only=True)["state_dict"]["w"].eq(0).sum() > 1000  # loads, silently zeroed
    with pytest.raises(ValueError, match=r"checkpoint .*last.ckpt does not match .*last.ckpt.sha256.json: its SHA-256"):
        check_checkpoint_file(ckpt)
    (tmp_path / "last.ckpt.sha256.json").unlink()
    with pytest.raises(ValueError, match=r"last.ckpt is damaged: member .* fails its CRC check"):
        check_checkpoint_file(ckpt)
    io.remove_checkpoint(ckpt)
    io.save_checkpoint(lightning_like(), ckpt)
    io.remove_checkpoint(ckpt)  # the sidecar goes with its checkpoint
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [
    ("pickled", r"holds pickled Python objects .* not written by experiments.run"),
    ("empty_zip", r"zip archive without a torch payload"),
    ("empty_file", r"is empty \(0 bytes\)"),
    ("plain_tensors", r"is a torch file but not a Lightning training checkpoint .*missing 'pytorch-lightning_version'"
                      r".*--model.init_args.student_ckpt"),
])
def test_a_checkpoint_it_cannot_resume_is_refused_in_project_words_before_any_model_loads(
        env, tmp_path, no_model_loads, content, message):
    import zipfile

    ckpt = tmp_path / "given.ckpt"
    if content == "pickled":
        torch.save(lightning_like(payload=NotATensor()), ckpt)
    elif content == "empty_zip":
        zipfile.ZipFile(ckpt, "w").close()
    elif content == "empty_file":
        ckpt.write_bytes(b"")
    else:
        torch.save({"w": torch.ones(3)}, ckpt)
    with pytest.raises(ValueError, match=message) as err:
        main(stage_cli_args(*env, "kd", tmp_path, 2, ["--ckpt_path", str(ckpt)]))
    assert str(ckpt) in str(err.value) and "weights_only=False" not in str(err.value)


def _gpt2_folder(folder):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=97).save_pretrained(folder)  # a config, no weights
    return folder


@pytest.mark.parametrize("teacher, error, message", [
    ("{tmp}/no/such/teacher", FileNotFoundError, r"teacher '.*/no/such/teacher' does not exist; expected a local folder "
                                                 r"with config.json and the weights, a hub id"),
    ("{tmp}/empty_folder", FileNotFoundError, r"teacher folder '.*empty_folder' has no config.json"),
    ("{tmp}/gpt2", ValueError, r"unsupported teacher architecture model_type='gpt2'; supported families: .*llama"),
])
def test_a_teacher_that_cannot_serve_is_refused_before_any_model_loads(env, tmp_path, no_model_loads, teacher, error,
                                                                       message):
    (tmp_path / "empty_folder").mkdir()
    _gpt2_folder(tmp_path / "gpt2")
    args = stage_cli_args(*env, "kd", tmp_path, 2)
    args[args.index("--model.init_args.teacher") + 1] = teacher.format(tmp=tmp_path)
    with pytest.raises(error, match=message):
        main(args)


def test_an_unsupported_teacher_is_refused_from_its_config_before_its_weights(tmp_path):
    from models import load_teacher

    # the folder has no weights at all: reaching them would fail differently
    with pytest.raises(ValueError, match="unsupported teacher architecture model_type='gpt2'"):
        load_teacher(str(_gpt2_folder(tmp_path / "gpt2")))


@pytest.mark.parametrize("key, value, message", [
    ("--data.batch_size", "-1", r"data.batch_size=-1 is invalid; allowed values: an integer >= 1"),
    ("--data.batch_size", "0", r"data.batch_size=0 is invalid"),
    ("--data.num_workers", "-2", r"data.num_workers=-2 is invalid; allowed values: an integer >= 0"),
    ("--data.max_val_blocks", "0", r"data.max_val_blocks=0 is invalid; allowed values: an integer >= 1 \(or null\)"),
])
def test_bad_data_numbers_are_refused_before_any_model_loads(env, tmp_path, no_model_loads, key, value, message):
    with pytest.raises(ValueError, match=message):
        main(stage_cli_args(*env, "kd", tmp_path, 2, [key, value]))


def test_trust_remote_code_reaches_the_data_modules_tokenizer(env, tmp_path, no_model_loads):
    cli = main(stage_cli_args(*env, "kd", tmp_path, 2, ["--model.init_args.trust_remote_code", "true"])[1:], run=False)
    assert cli.datamodule.trust_remote_code is True and cli.model.hparams.trust_remote_code is True
    cli = main(stage_cli_args(*env, "kd", tmp_path, 2)[1:], run=False)
    assert cli.datamodule.trust_remote_code is False


def test_checkpoint_manifests_can_be_turned_off_and_resuming_still_checks_the_crcs(env, tmp_path):
    args = checkpointed(env, "align", tmp_path, 2, 2, ["--checkpoint_manifest", "false"])
    cli = main(args)
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert cli.trainer.strategy.checkpoint_io.manifest is False
    assert ckpt.is_file() and not (tmp_path / "ckpt" / "last.ckpt.sha256.json").exists()
    from callbacks.safeguards import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint(torch.load(ckpt, weights_only=True), ckpt)  # with a sidecar
    AtomicCheckpointIO(manifest=False).save_checkpoint(torch.load(ckpt, weights_only=True), ckpt)
    assert not (tmp_path / "ckpt" / "last.ckpt.sha256.json").exists()  # never left describing old bytes
    _zero_the_middle(ckpt)
    with pytest.raises(ValueError, match="fails its CRC check"):
        main(checkpointed(env, "align", tmp_path, 4, 2, ["--ckpt_path", str(ckpt)]))
