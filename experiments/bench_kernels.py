"""The kernels benchmark: the hybrid op's forms (Triton, chunkwise torch, quadratic reference) against
the teacher's causal SDPA and the mlstm_kernels mLSTM, one layer at the teacher's head shapes.

One module per benchmark keeps ``experiments.bench`` an entry point; this one times each op
forward and forward + backward, and per token in decoding, and sets the rates achieved against
the floor each op must compute and move (``experiments.flops.op_floor``).
"""

from __future__ import annotations

import gc
import statistics

import torch

from experiments.bench_base import BenchBase
from experiments.bench_report import markdown_table
from experiments.flops import op_floor
from experiments.measure import OUT_OF_MEMORY, out_of_memory, timed


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


class KernelsBenchmark(BenchBase):
    """``kernels``."""

    def kernels(self, lengths: list[int] = [512, 1024, 2048, 4096, 8192, 16384], batch: int = 1, repeats: int = 5,
                reference_max_length: int = 2048) -> dict:
        """The hybrid op against the teacher's attention at the teacher's head shapes, one layer.

        Rows, forward and forward + backward each: the hybrid op's Triton kernels (CUDA only; the
        interpreter on a CPU is for tests, not timing), its chunkwise torch form eager and compiled
        (``backend="compiled"``; for the gate mix also with the window's band written out, the form
        before the masked SDPA call), its quadratic
        reference (up to ``reference_max_length``), the mlstm_kernels chunkwise mLSTM alone (its
        native torch form; on CUDA also its Triton kernel), causal SDPA (the teacher's
        attention); and per-token decoding: the hybrid recurrent step against SDPA over a KV cache
        of the same length. Every row carries the FLOPs and bytes its op must at least compute
        and move (``op_floor``) and the rates achieved. The hybrid op runs as the student's layer
        calls it (``hybrid``'s memory norm, and its feature-mapped memory queries and keys as inputs;
        until 2026-12-07 it ran with the RMS memory norm on q and k whatever the layer).

        Args:
            lengths: sequence lengths.
            batch: sequences.
            repeats: timed calls per cell (median reported), after one untimed call; the cells of
                one length take turns, one call each.
            reference_max_length: longest length for the quadratic reference.
        """
        import torch.nn.functional as F
        from mlstm_kernels.torch import get_mlstm_kernel

        from kernels import (
            hybrid_attention, hybrid_attention_chunkwise, hybrid_attention_step, triton_unavailable_reason,
        )

        teacher, _ = self._loaded()
        config, hybrid = teacher.config, self._hybrid_config or self.hybrid
        H = config.num_attention_heads
        Hkv = getattr(config, "num_key_value_heads", None) or H
        D = getattr(config, "head_dim", None) or config.hidden_size // H
        # the op as the student's layer calls it: its memory norm (and weight) and, with softmax feature
        # maps, the memory branch on its own feature-mapped queries and keys (positive, summing to one;
        # the maps' products belong to the layer, not the op, and are not timed)
        opts = dict(window=hybrid.window, sink_tokens=hybrid.sink_tokens, mode=hybrid.mode, combine=hybrid.combine,
                    chunk_size=hybrid.chunk_size, memory_norm=hybrid.memory_norm,
                    norm_weight=torch.ones(H, D, device=self.device) if hybrid.memory_norm == "rms" else None)
        memory_inputs = hybrid.feature_map == "softmax" and hybrid.mode != "swa"

        def split(xs):  # (q, k, v, i, f, g) and the memory's own mq, mk as keywords, where the layer has them
            return xs[:6], dict(zip(("mq", "mk"), xs[6:]))
        mlstm_names = ["chunkwise--native_autograd"]
        if self.device.type == "cuda" and _power_of_two(D):
            mlstm_names.append("chunkwise--triton_limit_chunk")
        triton_reason = ("the timed Triton rows need CUDA" if self.device.type != "cuda" else
                         triton_unavailable_reason(self.device, self.dtype, D, D, hybrid.chunk_size))
        element = torch.tensor([], dtype=self.dtype).element_size()
        rows = []

        def measure(name, kind, length, fn, per_token=False):
            """Queue a cell; ``run_cells`` times the cells of one length together."""
            cells.append((name, kind, length, fn, per_token, torch.is_grad_enabled()))

        def run_cells():
            """Time the queued cells round-robin: each repeat calls every op once, so that the
            machine's drift within a run (10-30 % here) falls on every op of a length alike and
            their ratios hold, where timing one op's repeats after another's would not."""
            live = []  # (row, floor, fn, per_token, grad, times) of the cells that ran their warm-up
            for name, kind, length, fn, per_token, grad in cells:
                row = {"op": name, "pass": kind.split()[1], "length": length, "batch": batch}
                floor = op_floor(kind, batch, H, Hkv, length, D, D, hybrid, element)
                row.update(gflop=floor["flops"] / 1e9, floor_mb=floor["bytes"] / 1e6)
                try:
                    with torch.set_grad_enabled(grad):
                        fn()  # warm-up (and Triton compilation)
                    live.append((row, floor, fn, per_token, grad, []))
                except OUT_OF_MEMORY as err:
                    row["error"] = out_of_memory(err)
                rows.append(row)
                gc.collect()
            for _ in range(repeats):
                for cell in list(live):
                    row, _, fn, _, grad, times = cell
                    try:
                        with torch.set_grad_enabled(grad):
                            times.append(timed(fn, self.device)[1])
                    except OUT_OF_MEMORY as err:
                        row["error"] = out_of_memory(err)
                        live.remove(cell)
            for row, floor, _, per_token, _, times in live:
                median = statistics.median(times)
                row.update(ms=1e3 * median, tokens_per_s=(batch if per_token else batch * row["length"]) / median,
                           gflop_per_s=floor["flops"] / median / 1e9, gb_per_s=floor["bytes"] / median / 1e9)
            cells.clear()
            gc.collect()

        cells = []
        gen = torch.Generator().manual_seed(self.seed)
        for T in sorted(lengths):
            def rand(*shape, shift=0.0):
                return (torch.randn(*shape, generator=gen) + shift).to(self.device, self.dtype)

            q, k, v = rand(batch, H, T, D), rand(batch, Hkv, T, D), rand(batch, Hkv, T, D)
            i, f, g = (rand(batch, H, T).float(), rand(batch, H, T, shift=3.0).float(),
                       rand(batch, H, T, shift=-2.0).float())
            inputs = [q, k, v, i, f, g]
            if memory_inputs:
                inputs += [torch.softmax(rand(batch, H, T, D).float(), -1).to(self.dtype),
                           torch.softmax(rand(batch, Hkv, T, D).float(), -1).to(self.dtype)]
            leaves = [x.detach().requires_grad_(True) for x in inputs]

            def forward_backward(op):
                def run():
                    for x in leaves:
                        x.grad = None
                    op(*leaves).float().square().sum().backward()
                return run

            qh, kh, vh = q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            pad = (-T) % 64
            mlstm_inputs = [F.pad(x, (0, 0, 0, pad)).detach().requires_grad_(True) for x in (qh, kh, vh)] + [
                F.pad(i, (0, pad), value=-1e4).requires_grad_(True), F.pad(f, (0, pad), value=1e4).requires_grad_(True)]
            hybrid_backends = [("torch", "hybrid chunkwise torch"),
                               ("compiled", "hybrid chunkwise compiled")]  # compiled in the untimed warm-up call
            if hybrid.mode == "hybrid" and hybrid.combine == "gate":  # the window's form before 2026-12-07
                hybrid_backends.append(("band", "hybrid chunkwise torch, window band written out"))
            if triton_reason is None:
                hybrid_backends.insert(0, ("triton", "hybrid Triton"))
            if T <= reference_max_length:
                hybrid_backends.append(("reference", "hybrid reference, quadratic"))
            for backend, label in hybrid_backends:
                def op(*x, backend=backend):
                    args, memory = split(x)
                    if backend == "band":
                        return hybrid_attention_chunkwise(*args, window_form="band", **memory, **opts)
                    return hybrid_attention(*args, backend=backend, **memory, **opts)
                with torch.no_grad():
                    measure(f"{label} (forward)", "hybrid forward", T, lambda op=op: op(*inputs))
                measure(f"{label} (forward + backward)", "hybrid backward", T, forward_backward(op))
            sdpa = lambda q_, k_, v_, *gates: F.scaled_dot_product_attention(  # noqa: E731
                q_, k_, v_, is_causal=True, enable_gqa=True)
            with torch.no_grad():
                measure("teacher causal SDPA (forward)", "sdpa forward", T, lambda: sdpa(q, k, v))
            measure("teacher causal SDPA (forward + backward)", "sdpa backward", T, forward_backward(sdpa))
            for name in mlstm_names:
                kernel = get_mlstm_kernel(name)

                def mlstm(kernel=kernel):
                    x = mlstm_inputs
                    return kernel(q=x[0], k=x[1], v=x[2], i=x[3], f=x[4], chunk_size=64)

                def mlstm_backward(mlstm=mlstm):
                    for x in mlstm_inputs:
                        x.grad = None
                    mlstm().float().square().sum().backward()

                with torch.no_grad():
                    measure(f"mlstm_kernels {name} (forward, memory branch only)", "mlstm forward", T, mlstm)
                measure(f"mlstm_kernels {name} (forward + backward)", "mlstm backward", T, mlstm_backward)
            with torch.no_grad():
                args, memory = split(inputs)
                _, state = hybrid_attention(*args, return_state=True, **memory, **opts)
                one, one_memory = split([x[:, :, -1:].contiguous() for x in inputs])
                step_opts = {key: opts[key] for key in ("norm_weight", "memory_norm")}
                measure("hybrid recurrent step (one token after T)", "hybrid step", T,
                        lambda: hybrid_attention_step(*one, state, **one_memory, **step_opts), per_token=True)
                measure("teacher SDPA step over a KV cache of T", "sdpa step", T, lambda: F.scaled_dot_product_attention(
                    one[0], k, v, enable_gqa=True), per_token=True)
            run_cells()
        payload = self._payload("kernels", rows, {"heads": H, "kv_heads": Hkv, "head_dim": D, "repeats": repeats,
                                                  "triton": triton_reason or "timed",
                                                  "memory_norm": hybrid.memory_norm,
                                                  "feature_mapped_memory_inputs": memory_inputs})
        ops = list(dict.fromkeys(r["op"] for r in rows))
        table_rows, floor_rows = [], []
        for op in ops:
            cells = {r["length"]: r for r in rows if r["op"] == op}
            table_rows.append({"op": op, **{f"T{T}": cells[T].get("ms", cells[T].get("error")) if T in cells else None
                                            for T in sorted(lengths)}})
            longest = cells[max(cells)]
            floor_rows.append({"op": op, "length": longest["length"], "gflop": longest["gflop"],
                               "floor_mb": longest["floor_mb"], "gflop_per_s": longest.get("gflop_per_s"),
                               "gb_per_s": longest.get("gb_per_s")})
        columns = [("op", "op (one layer)", "")] + [(f"T{T}", f"ms at T={T}", ".3f") for T in sorted(lengths)]
        floor_columns = [("op", "op (one layer)", ""), ("length", "T", "d"), ("gflop", "GFLOP floor", ".3f"),
                         ("floor_mb", "MB floor", ".1f"), ("gflop_per_s", "GFLOP/s achieved", ".1f"),
                         ("gb_per_s", "GB/s achieved", ".1f")]
        note = "" if triton_reason is None else f"\n\nTriton rows: not timed ({triton_reason}).\n"
        table = (markdown_table(table_rows, columns) + "\n\nWhat each op must at least compute and move, at the "
                 "longest length, and the rates achieved:\n\n" + markdown_table(floor_rows, floor_columns) + note)
        series = []
        for op in ops:
            picked = sorted((r for r in rows if r["op"] == op), key=lambda r: r["length"])
            series.append((op, [r["length"] for r in picked], [r.get("ms") for r in picked],
                           ("s-" if op.startswith("hybrid") else "o--")))
        title = (f"Hybrid op vs the teacher's attention, one layer: {H} heads ({Hkv} key/value), head dim {D}, "
                 f"batch {batch}, {self.settings['dtype']}, {hybrid.describe()}")
        return self._finish("kernels", payload, table, title, [("ms per call (median)", series, True)])
