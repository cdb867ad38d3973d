"""The chunkwise mLSTM memory with its backward written out (``kernels.chunkwise.mlstm_chunkwise``).

The memory's sums over chunks of L positions, all in units of exp(stabiliser):
    num_t = sum_{s <= t} W_ts (q_t . k_s) v_s,   den_t = sum_{s <= t} W_ts (q_t . k_s),
    W_ts = exp(B_t - B_s + i_s - m_t),   B the cumulative log forget gate, m_t the row maximum,
the keys of earlier chunks entering through the state carried from chunk to chunk.

Autograd through that forward kept a dozen [chunk, chunk] and [D, Dv] tensors per chunk and ran
its backward as a long chain of small ops; on a CPU those ops, not the products, set the time
(docs/performance.md, "The memory's backward written out"). The backward here is the gated
linear attention's, chunk by chunk, in the same units as the forward, from what the forward keeps
(its inputs, stabilisers, chunk-entry states, outputs, and the intra-chunk weights W with their
product with q k^T, which spares the backward a product and an exp over [chunk, chunk]; under the
lean plan the forward runs again right before the backward, so they live one layer at a time):

- intra-chunk: P = W * (dnum v^T + dden), dq = P k, dk = P^T q, dv = (W * qk^T)^T dnum;
- a query reading the state entering its chunk: dq += w_inter (C dnum + n dden);
- a key read by later chunks (or the final state): the state's gradient G, scanned backward from
  the last chunk (G_c = carry_{c+1} G_{c+1} + the queries of chunk c + 1 weighted as they read it),
  gives dk += a (G v + g), dv += a G^T k, with a = exp(B_end - B_s + i_s - m_in) <= 1;
- the gates: every weight is exp(B_t - B_s + i_s) up to the stabilisers, so di_s = k_s . dk_s and
  dB_t = q_t . dq_t - k_t . dk_t (+ the final state's own share at a chunk's end);
- the stabilisers (m_t, the chunk-entry m_in) are inputs with their own gradient: an output in
  units of exp(-m) moves by -output when m moves, and the per-chunk stabilisers in between cancel.
  They are computed outside by ordinary differentiable ops (``memory_stabilisers``), so that the
  normaliser's floor exp(-m) and eps see exactly the gradient they saw before.

Every weight the backward forms is at most 1 (each is a forward weight over its own row maximum),
so it is as stable as the forward. Tested against autograd through the same forward and against
finite differences in float64 (tests/kernels/test_chunkwise_memory.py).
"""

from __future__ import annotations

import torch


def memory_stabilisers(i_gate, b, m0):
    """The stabilisers, differentiable: m_t [B,H,N,L] (the exact maximum over every log weight of
    query t, the entering state's included) and m_in [B,H,N+1] (the state entering each chunk, and
    after the last). i_gate, b (the log forget gate's cumulative sum within each chunk) [B,H,N,L];
    m0 [B,H] the stabiliser of the state before position 0."""
    # max over s <= t of b_t - b_s + i_s, as a running maximum (no [L, L] tensor)
    intra_max = b + torch.cummax(i_gate - b, dim=-1).values
    log_to_end = b[..., -1:] - b + i_gate
    chunk_max = log_to_end.amax(-1)  # [B,H,N]
    chunk_decay = b[..., -1]
    m_in = [m0]
    for c in range(b.shape[2]):
        m_in.append(torch.maximum(m_in[-1] + chunk_decay[:, :, c], chunk_max[:, :, c]))
    m_in = torch.stack(m_in, 2)
    m_t = torch.maximum(m_in[..., :-1].unsqueeze(-1) + b, intra_max)
    return m_t, m_in


def _intra_weights(i_gate, b, m_t):
    """W [B,H,N,L,L]: each query's weight on each key of its own chunk, zero above the diagonal."""
    L = b.shape[-1]
    tril = torch.ones(L, L, dtype=torch.bool, device=b.device).tril()
    return torch.exp((b - m_t).unsqueeze(-1) + (i_gate - b).unsqueeze(-2)).masked_fill(~tril, 0.0)


def _state_weights(i_gate, b, m_t, m_in):
    """w_inter (a query reading its chunk's entering state), a (a key written into the state after
    its chunk), carry (the state through a chunk)."""
    w_inter = torch.exp(m_in[..., :-1].unsqueeze(-1) + b - m_t)
    a = torch.exp(b[..., -1:] - b + i_gate - m_in[..., 1:].unsqueeze(-1))
    carry = torch.exp(m_in[..., :-1] + b[..., -1] - m_in[..., 1:])
    return w_inter, a, carry


def memory_sums(q, k, v, i_gate, b, m_t, m_in, C0, n0):
    """The forward: num [B,H,N,L,Dv], den [B,H,N,L], the states entering each chunk (C [B,H,N,D,Dv],
    n [B,H,N,D]) and after the last (C, n), the intra-chunk weights W and W * (q k^T) [B,H,N,L,L].
    q (already scaled), k [B,H,N,L,D], v [B,H,N,L,Dv]; the rest as ``memory_stabilisers`` returns
    them; C0, n0 the state before position 0 (units exp(m0))."""
    W = _intra_weights(i_gate, b, m_t)
    w_inter, a, carry = _state_weights(i_gate, b, m_t, m_in)
    ka = k * a.unsqueeze(-1)
    chunk_C, chunk_n = ka.transpose(-1, -2) @ v, ka.sum(-2)
    C_in, n_in = [C0], [n0]
    for c in range(q.shape[2]):
        C_in.append(torch.addcmul(chunk_C[:, :, c], C_in[-1], carry[:, :, c, None, None]))
        n_in.append(torch.addcmul(chunk_n[:, :, c], n_in[-1], carry[:, :, c, None]))
    C_all, n_all = torch.stack(C_in[:-1], 2), torch.stack(n_in[:-1], 2)
    WS = W * (q @ k.transpose(-1, -2))
    num = torch.addcmul(WS @ v, w_inter.unsqueeze(-1), q @ C_all)
    den = torch.addcmul(WS.sum(-1), w_inter, (q @ n_all.unsqueeze(-1)).squeeze(-1))
    return num, den, C_all, n_all, C_in[-1], n_in[-1], W, WS


class MemorySums(torch.autograd.Function):
    """``memory_sums`` (num, den, final C and n) with the backward of the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, i_gate, b, m_t, m_in, C0, n0):
        num, den, C_all, n_all, C_end, n_end, W, WS = memory_sums(q, k, v, i_gate, b, m_t, m_in, C0, n0)
        ctx.save_for_backward(q, k, v, i_gate, b, m_t, m_in, C_all, n_all, C_end, n_end, num, den, W, WS)
        return num, den, C_end, n_end

    @staticmethod
    def backward(ctx, d_num, d_den, d_C_end, d_n_end):
        q, k, v, i_gate, b, m_t, m_in, C_all, n_all, C_end, n_end, num, den, W, WS = ctx.saved_tensors
        d_num = torch.zeros_like(num) if d_num is None else d_num
        d_den = torch.zeros_like(den) if d_den is None else d_den
        d_C_end = torch.zeros_like(C_end) if d_C_end is None else d_C_end
        d_n_end = torch.zeros_like(n_end) if d_n_end is None else d_n_end
        w_inter, a, carry = _state_weights(i_gate, b, m_t, m_in)  # W was kept
        N = q.shape[2]
        # only what is asked for (alignment: v comes from the frozen teacher and needs none); the
        # gates' gradients are read off dq and dk
        need = ctx.needs_input_grad
        gates = need[3] or need[4]
        want_q, want_k, want_v = need[0] or gates, need[1] or gates, need[2]
        dq = dk = dv = None

        # within each chunk
        if want_q or want_k:
            P = W * (d_num @ v.transpose(-1, -2) + d_den.unsqueeze(-1))
        if want_q:  # and the state entering the chunk, which its queries read
            dq = torch.addcmul(P @ k, w_inter.unsqueeze(-1), torch.addcmul(
                d_num @ C_all.transpose(-1, -2), d_den.unsqueeze(-1), n_all.unsqueeze(-2)))
        if want_k:
            dk = P.transpose(-1, -2) @ q
        if want_v:
            dv = WS.transpose(-1, -2) @ d_num
        # the state's gradient, from the last chunk back: G[c] is the gradient of the state after chunk c
        qw = q * w_inter.unsqueeze(-1)
        read_C, read_n = qw.transpose(-1, -2) @ d_num, (qw * d_den.unsqueeze(-1)).sum(-2)
        G, g = [d_C_end], [d_n_end]
        for c in range(N - 1, 0, -1):
            G.append(torch.addcmul(read_C[:, :, c], G[-1], carry[:, :, c, None, None]))
            g.append(torch.addcmul(read_n[:, :, c], g[-1], carry[:, :, c, None]))
        d_C0 = torch.addcmul(read_C[:, :, 0], G[-1], carry[:, :, 0, None, None])
        d_n0 = torch.addcmul(read_n[:, :, 0], g[-1], carry[:, :, 0, None])
        G, g = torch.stack(G[::-1], 2), torch.stack(g[::-1], 2)  # [B,H,N,D,Dv], [B,H,N,D]
        # keys written into the states their chunk hands on
        if want_k:
            dk += a.unsqueeze(-1) * (v @ G.transpose(-1, -2) + g.unsqueeze(-2))
        if want_v:
            dv += a.unsqueeze(-1) * (k @ G)

        d_i = d_b = None
        if gates:
            d_i = (k * dk).sum(-1)
            d_b = (q * dq).sum(-1) - d_i
            # the state after chunk c grows with exp(b at the chunk's end) as a whole
            C_after = torch.cat([C_all[:, :, 1:], C_end.unsqueeze(2)], 2)
            n_after = torch.cat([n_all[:, :, 1:], n_end.unsqueeze(2)], 2)
            d_b[..., -1] += (G * C_after).sum((-1, -2)) + (g * n_after).sum(-1)
        # the outputs are in units of exp(-m_t); the final state in exp(-m_in[N]), the initial in
        # exp(m_in[0]); the stabilisers of the states in between cancel
        d_m_t = -((d_num * num).sum(-1) + d_den * den)
        d_m_in = torch.zeros_like(m_in)
        d_m_in[..., 0] = (d_C0 * C_all[:, :, 0]).sum((-1, -2)) + (d_n0 * n_all[:, :, 0]).sum(-1)
        d_m_in[..., -1] = -((d_C_end * C_end).sum((-1, -2)) + (d_n_end * n_end).sum(-1))
        grads = (dq, dk, dv, d_i, d_b, d_m_t, d_m_in, d_C0, d_n0)
        return tuple(grad if wanted else None for grad, wanted in zip(grads, need))
