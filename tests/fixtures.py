"""On-disk fixtures for stage tests: a tiny teacher folder with a word-level tokenizer and chat
template, and small text/chat corpora."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import make_teacher

SPECIAL = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>"]
WORDS = [f"w{i}" for i in range(97 - len(SPECIAL))]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <eos> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_teacher(path: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    model = make_teacher(family, seed=seed, init_std=0.05, **overrides)
    model.config.eos_token_id = 2
    model.config.pad_token_id = 1
    model.save_pretrained(str(path))
    make_tokenizer().save_pretrained(str(path))
    return path


def write_corpus(folder: Path, n_docs: int = 120, n_chats: int = 40, seed: int = 0) -> dict[str, Path]:
    """Text documents with learnable structure (counting sequences) and short conversations."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "general.jsonl"
    with text.open("w") as f:
        for _ in range(n_docs):
            start, step = rng.randrange(len(WORDS)), rng.choice([1, 2, 3])
            words = [WORDS[(start + step * j) % len(WORDS)] for j in range(rng.randint(20, 60))]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    chat = folder / "chat.jsonl"
    with chat.open("w") as f:
        for _ in range(n_chats):
            a = rng.randrange(len(WORDS) - 5)
            messages = [{"role": "user", "content": " ".join(WORDS[a:a + 3])},
                        {"role": "assistant", "content": " ".join(WORDS[a + 3:a + 5])}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return {"text": text, "chat": chat}


def stage_cli_args(root: Path, corpus: dict, stage: str, out: Path, steps: int = 3, extra=()) -> list[str]:
    """``experiments.run fit`` arguments for a stage on the tiny teacher in ``root`` and ``corpus``
    (seq_len 32, window 16), writing logs and the student under ``out``."""
    sources = json.dumps([{"path": str(corpus["text"])}, {"path": str(corpus["chat"]), "format": "chat"}])
    return ["fit", "--config", f"configs/stages/{stage}.yaml", "--model.init_args.teacher", str(root / "teacher"),
            "--data.sources", sources, "--data.seq_len", "32", "--data.batch_size", "4",
            "--model.init_args.hybrid.window", "16",
            "--data.cache_dir", str(root / "cache"), "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "2",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--trainer.logger.init_args.save_dir", str(out), "--student_export.dirpath", str(out / "student"),
            *extra]
