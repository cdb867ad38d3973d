"""FLOP and byte models: what a prefill, and one layer's attention op, must at least compute and move.

Pure arithmetic on a model's configuration and the hybrid layer's settings, with no torch and no
timing: the prefill benchmark divides measured times by ``prefill_flops`` (achieved GFLOP/s, the
student's FLOPs against the teacher's), the kernels benchmark by ``op_floor`` (achieved GFLOP/s
and GB/s). Kept apart so the counts can be read, and tested against hand counts, on their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models import HybridConfig


def prefill_flops(config, hybrid: HybridConfig, prompt: int) -> dict:
    """Multiply-add FLOPs (x2) of one prompt's forward, teacher vs hybrid student, and where they go.

    Shared: every linear layer over all tokens (q/k/v/o, MLP; the gates for the student) and the
    head for the last token only. Teacher attention: causal q.k and p.v, T(T+1)/2 pairs per head.
    Student, as the chunkwise form computes it: each chunk of L queries against its band of
    L + W - 1 keys plus the sinks (window branch), and the mLSTM's intra-chunk L x L products plus
    one state read and one state update per token (memory branch); the gates and, with
    ``feature_map: softmax``, one d x d product per query and key head and token.
    ``student_least_flops``: the least any form of the layer (parallel, chunkwise, recurrent or a mix)
    computes: each query against its own window and sink keys only (``window_pairs``); per token,
    the memory's recurrence (its [D, D] state and normaliser read and updated) or, where cheaper
    (the first D tokens), the keys before it read directly; the same gates and feature maps. Below
    the teacher's FLOPs only where a student can be faster than its teacher at the teacher's
    efficiency.
    """
    d, L_layers = config.hidden_size, config.num_hidden_layers
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    D = getattr(config, "head_dim", None) or d // H
    ff = config.intermediate_size
    per_token_linear = L_layers * (d * H * D * 2 + d * Hkv * D * 2 + 3 * d * ff)
    shared = 2 * prompt * per_token_linear + 2 * d * config.vocab_size
    teacher_attention = L_layers * H * 4 * D * prompt * (prompt + 1) / 2
    full = set(hybrid.full_attention_layers)
    hybrid_layers = L_layers - len([i for i in full if i < L_layers])
    chunk = min(hybrid.chunk_size, prompt)
    window_keys = min(prompt, chunk + hybrid.window - 1) + hybrid.sink_tokens
    student_window = 4 * H * D * prompt * window_keys if hybrid.mode != "mlstm" else 0
    student_memory = (4 * H * D * prompt * chunk + 4 * H * D * D * prompt) if hybrid.mode != "swa" else 0
    if hybrid.gate_input == "qkv":  # i, f from x; o from each head's [q; k; v]
        gates = 2 * prompt * d * 2 * H + (2 * prompt * H * 3 * D if hybrid.mode == "hybrid" else 0)
    else:
        gates = 2 * prompt * d * 3 * H
    feature_maps = 2 * prompt * (H + Hkv) * D * D if hybrid.feature_map == "softmax" and hybrid.mode != "swa" else 0
    full_layers = (L_layers - hybrid_layers) * H * 4 * D * prompt * (prompt + 1) / 2
    student_attention = hybrid_layers * (student_window + student_memory + gates + feature_maps) + full_layers
    # What any implementation of the layer must compute: each query against exactly its own keys
    # (no band of a chunk's neighbours); the memory, per token, the cheaper of its recurrence (the
    # state C and normaliser n read and updated: 4 (D^2 + D)) and reading the t + 1 keys before it
    # directly as the parallel form does (4 D (t + 1): cheaper for the first D tokens); the same
    # gates and feature maps.
    least_window = 4 * H * D * window_pairs(prompt, hybrid.window, hybrid.sink_tokens) if hybrid.mode != "mlstm" else 0
    least_memory = 4 * H * D * capped_prefix_sum(prompt, D + 1) if hybrid.mode != "swa" else 0
    least_attention = hybrid_layers * (least_window + least_memory + gates + feature_maps) + full_layers
    return {"shared_flops": shared, "teacher_attention_flops": teacher_attention,
            "student_attention_flops": student_attention, "teacher_flops": shared + teacher_attention,
            "student_flops": shared + student_attention, "student_least_flops": shared + least_attention}


def capped_prefix_sum(n: int, cap: int) -> int:
    """sum of min(u, cap) for u = 1 .. n."""
    return n * (n + 1) // 2 if n <= cap else cap * (cap + 1) // 2 + (n - cap) * cap


def window_pairs(prompt: int, window: int, sink_tokens: int) -> int:
    """(query, key) pairs the window branch reads over a prompt: query t reads keys t - window + 1
    .. t and the sinks 0 .. sink_tokens - 1 (each key once), min(t + 1, window) + min(sink_tokens,
    max(0, t + 1 - window)) of them."""
    # the queries whose window no longer starts at 0 (u = t + 1 - window = 1 .. prompt - window)
    # read up to sink_tokens sinks outside it
    return capped_prefix_sum(prompt, window) + capped_prefix_sum(max(0, prompt - window), sink_tokens)


def op_floor(kind: str, B: int, H: int, Hkv: int, T: int, D: int, Dv: int, hybrid: HybridConfig,
             element_bytes: int) -> dict:
    """FLOPs (multiply-adds x 2) and bytes one layer's op must at least compute and move.

    kind: "<op> <pass>", op in hybrid | sdpa | mlstm, pass in forward | backward (forward + backward)
    | step (one token after T). Bytes: inputs read and outputs written once (q, k, v, gates in,
    the output out; the backward also reads the output gradient and writes every input's). FLOPs,
    per head and query: the hybrid op as its chunked form computes it, the window branch against
    min(T, window) + sinks keys and the memory branch a chunk of keys plus one state read and one
    state update; causal SDPA over (T + 1) / 2 keys on average; the mLSTM alone its memory branch.
    A backward costs about twice its forward (the recomputed forward plus two products per one).
    """
    op, phase = kind.split()
    L = hybrid.chunk_size
    qkv = (B * H * T * D + B * Hkv * T * (D + Dv)) * element_bytes
    gates = {"hybrid": 3, "mlstm": 2, "sdpa": 0}[op] * B * H * T * 4
    out = B * H * T * Dv * element_bytes
    if phase == "step":
        keys = {"hybrid": min(T, hybrid.window) + hybrid.sink_tokens, "sdpa": T}[op]
        state = (B * H * (D * Dv + D) * 4) if op == "hybrid" else 0
        flops = 2 * B * H * keys * (D + Dv) + (4 * B * H * D * Dv if op == "hybrid" else 0)
        cache = (B * Hkv * keys * (D + Dv) * element_bytes) + 2 * state
        return {"flops": flops, "bytes": cache + (B * H * D + B * Hkv * (D + Dv)) * element_bytes + B * H * Dv * 4}
    memory = 2 * B * H * T * (min(L, T) * (D + Dv) / 2 + 2 * D * Dv)
    window_keys = min(T, hybrid.window) + hybrid.sink_tokens
    if op == "sdpa":
        forward = 2 * B * H * (T * (T + 1) / 2) * (D + Dv)
    elif op == "mlstm":
        forward = memory
    else:
        forward = (memory if hybrid.mode != "swa" else 0) + (
            2 * B * H * T * window_keys * (D + Dv) if hybrid.mode != "mlstm" else 0)
    moved = qkv + gates + out
    if phase == "forward":
        return {"flops": forward, "bytes": moved}
    return {"flops": 3 * forward, "bytes": 2 * moved + out}


def training_step_flops(config, hybrid: HybridConfig, stage: str, batch: int, seq_len: int) -> float | None:
    """FLOPs of one optimizer step that trains every parameter: a forward (``prefill_flops``, with the
    head over every position, not only the last) and a backward of twice that (the gradients w.r.t.
    each product's input and weight). KD (``kd``, ``kd_cached``): the hybrid student's, plus the
    teacher's forward when its top-k is computed online (``kd``); ``teacher_lm``: the teacher's own
    language-model step (the reference a KD step's ratio to its floor is read against). None for
    stages this does not model (alignment trains a few parameters of the attention modules alone;
    Distil-xLSTM is another family)."""
    if stage not in ("kd", "kd_cached", "teacher_lm"):
        return None
    counts = prefill_flops(config, hybrid, seq_len)
    head_rest = 2 * config.hidden_size * config.vocab_size * (seq_len - 1)
    teacher_forward = batch * (counts["teacher_flops"] + head_rest)
    if stage == "teacher_lm":
        return 3 * teacher_forward
    student_forward = batch * (counts["student_flops"] + head_rest)
    return 3 * student_forward + (teacher_forward if stage == "kd" else 0)
