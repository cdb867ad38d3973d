"""Recurrent decoding for hybrid students (and the same call for Hugging Face teachers)."""

from __future__ import annotations

import torch
from torch import nn

from .state import DecodeState
from .student import StudentLM


def _next_token(logits, do_sample, temperature, top_p, generator):
    """logits [B, V] -> [B] token ids (greedy, or temperature / nucleus sampling)."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} is invalid for sampling; allowed values: > 0")
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: StudentLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Run the prompt through the chunkwise form and return (last logits [B, V], DecodeState).

    Rows of a left- or right-padded batch are prefilled unpadded, grouped by length, and their
    constant-size states stacked, so every row decodes exactly as it would alone.
    """
    B, T = input_ids.shape
    if attention_mask is None or bool(attention_mask.bool().all()):
        state = model.new_decode_state()
        out = model(input_ids, decode_state=state, logits_to_keep=1)
        return out.logits[:, -1], state
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("every row of attention_mask needs at least one real token to generate from")
    rows_by_len: dict[int, list[int]] = {}
    for row, n in enumerate(lengths.tolist()):
        rows_by_len.setdefault(n, []).append(row)
    logits, states, order = [], [], []
    for n, rows in rows_by_len.items():
        ids = torch.stack([input_ids[r][mask[r]] for r in rows])
        state = model.new_decode_state()
        out = model(ids, decode_state=state, logits_to_keep=1)
        logits.append(out.logits[:, -1])
        states.append(state)
        order.extend(rows)
    inverse = torch.empty(B, dtype=torch.long, device=input_ids.device)
    inverse[torch.tensor(order, device=input_ids.device)] = torch.arange(B, device=input_ids.device)
    return torch.cat(logits).index_select(0, inverse), DecodeState.cat(states).index_select(inverse)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None, *, attention_mask=None,
             pad_token_id=None, generator: torch.Generator | None = None) -> torch.LongTensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` [B, T] (left or right padding with
    ``attention_mask``). A hybrid student decodes recurrently with a constant-size state; any other
    causal LM (a teacher) goes through its own ``generate`` with the same arguments.

    Returns [B, T + n] with n <= max_new_tokens: decoding stops when every row has emitted an EOS,
    after which a finished row is filled with ``pad_token_id`` (default: the first EOS id).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid; allowed values: >= 0")
    eos_ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    if not isinstance(model, StudentLM):
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id, attention_mask=attention_mask)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        return model.generate(input_ids, **kwargs)
    if max_new_tokens == 0:
        return input_ids
    was_training = model.training
    model.eval()
    try:
        logits, state = prefill(model, input_ids, attention_mask)
        eos = torch.tensor(eos_ids, device=input_ids.device, dtype=torch.long)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = _next_token(logits, do_sample, temperature, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            new_tokens.append(token)
            if eos.numel():
                finished = finished | torch.isin(token, eos)
                if bool(finished.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = model(token[:, None], decode_state=state).logits[:, -1]
        return torch.cat([input_ids, torch.stack(new_tokens, 1)], 1)
    finally:
        model.train(was_training)

