"""Tokenisation and packing: documents -> fixed-length blocks with labels."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator

import torch

from models.targets import IGNORE


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer: vocabulary, special tokens and chat template."""
    payload = json.dumps({
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(map(str, tokenizer.all_special_tokens)),
        "eos": tokenizer.eos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; packing needs one to separate documents")
    return int(tokenizer.eos_token_id)


def encode_text(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """A document followed by EOS; every token is trained on."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id(tokenizer)]
    return ids, [True] * len(ids)


def _render(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if not isinstance(ids, list):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """A conversation through the tokenizer's chat template; loss only on assistant tokens.

    Each message's tokens are found by rendering the conversation up to it and after it: the
    template must render a prefix of the conversation as a prefix of the tokens (true of common
    templates; checked, with a clear error otherwise)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("format 'chat' needs a tokenizer with a chat template")
    full = _render(tokenizer, messages)
    mask = [False] * len(full)
    start = 0
    for i, message in enumerate(messages):
        end_ids = _render(tokenizer, messages[: i + 1])
        end = len(end_ids)
        if full[:end] != end_ids:
            raise ValueError("the chat template does not render conversation prefixes as token prefixes; "
                             "assistant-only loss cannot be located for this tokenizer")
        if message.get("role") == "assistant":
            # the header ("<|im_start|>assistant\n") is the prompt: skip what a generation prompt adds
            header = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
            for t in range(max(start, header), end):
                mask[t] = True
        start = end
    return full, mask


def pack(examples: Iterable[tuple[list[int], list[bool]]], seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Concatenate examples and cut blocks of ``seq_len`` tokens: (input_ids, labels), labels equal
    to the tokens where the loss applies and IGNORE elsewhere; a trailing partial block is dropped."""
    ids_buf: list[int] = []
    mask_buf: list[bool] = []
    for ids, mask in examples:
        ids_buf.extend(ids)
        mask_buf.extend(mask)
        while len(ids_buf) >= seq_len:
            ids = torch.tensor(ids_buf[:seq_len], dtype=torch.long)
            keep = torch.tensor(mask_buf[:seq_len], dtype=torch.bool)
            yield ids, torch.where(keep, ids, torch.full_like(ids, IGNORE))
            del ids_buf[:seq_len], mask_buf[:seq_len]
