"""Distil-xLSTM students: a purely recurrent xLSTM student built from the ``xlstm`` package's blocks.

Thiombiano et al., "Distil-xLSTM: Learning Attention Mechanisms through Recurrent Structures": the
teacher's embedding layer and LM head are copied into the student and frozen; the sequence mixers
are L_s = floor(L_t / 2) xLSTM blocks with H_s = roundup(H_t, 4) heads, sLSTM and mLSTM alternating
1:1 starting with sLSTM. Only the blocks (and the final norm) train.

The blocks are the package's own modules (``xlstm.xLSTMBlockStack``: sLSTM cells with their
vanilla or CUDA kernels, mLSTM layers with their projections, convolutions, gates and norms). The
package's mLSTM *layer* computes its cell with a quadratic, stateless form; here the same cell
parameters feed ``mlstm_kernels`` instead (chunkwise on CPU, Triton on a GPU), which is linear in
the sequence, returns the final (C, n, m) state and so lets a prompt be prefilled in parallel and
continued step by step. Sequences of any length work: they are padded to the chunk size with
steps that leave the state unchanged (input gate -1e4, forget gate +1e4). That this is the
package's function is a test: ``tests/models/test_distil_xlstm.py`` compares every block with the
package's own ``forward``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import get_adapter
from .student import StudentLM, decoder_stack
from .teacher import teacher_fingerprint

SLSTM_BACKENDS = ("auto", "vanilla", "cuda")
# Gate pre-activations of padding steps: exp(-1e4) = 0 (nothing written), logsigmoid(1e4) = 0
# (nothing forgotten), so the state after the padding equals the state after the last real token.
_PAD_INPUT_GATE, _PAD_FORGET_GATE = -1.0e4, 1.0e4


def roundup(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class DistilXLSTMConfig:
    """How a teacher becomes a Distil-xLSTM student; ``None`` fields follow the paper's heuristics."""

    num_blocks: int | None = None
    """xLSTM blocks (None: floor(teacher layers / 2))."""
    num_heads: int | None = None
    """Heads of every block (None: the teacher's attention heads rounded up to a multiple of 4)."""
    slstm_at: list[int] | None = None
    """Indices of the sLSTM blocks, the others are mLSTM (None: 0, 2, 4, ... — 1:1, sLSTM first)."""
    mlstm_proj_factor: float = 2.0
    """mLSTM blocks: inner width / model width (the xLSTM paper's pre-up-projection block)."""
    qkv_proj_blocksize: int = 4
    """mLSTM blocks: block size of the block-diagonal q/k/v projections."""
    conv1d_kernel_size: int = 4
    """Causal convolution width in both block types (>= 2)."""
    slstm_ffn_proj_factor: float = 1.3
    """sLSTM blocks: gated feed-forward width / model width (the xLSTM paper's post-up-projection block)."""
    chunk_size: int = 64
    """Chunk length of the chunkwise mLSTM kernel (a power of two)."""
    mlstm_kernel: str = "auto"
    """``auto`` (``chunkwise--triton_limit_chunk`` on CUDA when the head dimensions are powers of two
    >= 16, else ``chunkwise--native_autograd``) or an ``mlstm_kernels`` chunkwise kernel name."""
    slstm_backend: str = "auto"
    """sLSTM cell kernel: ``vanilla`` (PyTorch, any device), ``cuda`` (the package's compiled kernel,
    needs nvcc), ``auto`` (vanilla)."""
    freeze_embeddings: bool = True
    """Keep the copied embedding and LM head frozen, as the paper does (the ``trainable: all`` setting
    of a stage overrides this)."""

    def __post_init__(self):
        for name in ("num_blocks", "num_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"DistilXLSTMConfig.{name}={value!r} is invalid; allowed values: an integer >= 1, or null")
        if self.slstm_at is not None:
            at = list(self.slstm_at)
            if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in at) or len(set(at)) != len(at):
                raise ValueError(f"DistilXLSTMConfig.slstm_at={self.slstm_at!r} is invalid; allowed values: "
                                 "distinct block indices >= 0, or null for 0, 2, 4, ...")
            self.slstm_at = sorted(at)
        if self.conv1d_kernel_size < 2:
            raise ValueError(f"DistilXLSTMConfig.conv1d_kernel_size={self.conv1d_kernel_size} is invalid; allowed values: >= 2")
        if self.chunk_size < 16 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"DistilXLSTMConfig.chunk_size={self.chunk_size} is invalid; allowed values: a power of two >= 16")
        if self.slstm_backend not in SLSTM_BACKENDS:
            raise ValueError(f"DistilXLSTMConfig.slstm_backend={self.slstm_backend!r} is not supported; "
                             f"allowed values: {', '.join(SLSTM_BACKENDS)}")
        if self.mlstm_kernel != "auto":
            from mlstm_kernels.torch import get_available_mlstm_kernels

            allowed = [k for k in get_available_mlstm_kernels() if k.startswith("chunkwise--")]
            if self.mlstm_kernel not in allowed:
                raise ValueError(f"DistilXLSTMConfig.mlstm_kernel={self.mlstm_kernel!r} is not supported; "
                                 f"allowed values: auto, {', '.join(allowed)}")
        if self.mlstm_proj_factor <= 0 or self.slstm_ffn_proj_factor <= 0:
            raise ValueError("DistilXLSTMConfig.mlstm_proj_factor and slstm_ffn_proj_factor must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "DistilXLSTMConfig") -> "DistilXLSTMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown DistilXLSTMConfig field(s) {', '.join(unknown)}; "
                             f"known fields: {', '.join(sorted(known))}")
        return cls(**d)

    def resolved(self, model_config) -> "DistilXLSTMConfig":
        """This config with the heuristics applied to a teacher's model config (no None left)."""
        layers, heads = model_config.num_hidden_layers, model_config.num_attention_heads
        num_blocks = self.num_blocks or layers // 2
        if num_blocks < 1:
            raise ValueError(f"the teacher has {layers} layer(s), so floor(L_t / 2) = 0 xLSTM blocks; "
                             "set distil_xlstm.num_blocks explicitly")
        slstm_at = list(range(0, num_blocks, 2)) if self.slstm_at is None else list(self.slstm_at)
        if any(i >= num_blocks for i in slstm_at):
            raise ValueError(f"DistilXLSTMConfig.slstm_at={slstm_at} has indices >= num_blocks={num_blocks}; "
                             f"allowed values: 0..{num_blocks - 1}")
        return replace(self, num_blocks=num_blocks, num_heads=self.num_heads or roundup(heads, 4), slstm_at=slstm_at)


# ---- decoding state --------------------------------------------------------------------------

@dataclass
class XLSTMBlockState:
    """State of one xLSTM block between calls. ``tensors`` all have the batch first: ``conv`` the last
    (kernel - 1) inputs of the causal convolution; mLSTM ``c`` [B, H, Dqk, Dv], ``n`` [B, H, Dqk],
    ``m`` [B, H, 1] as ``mlstm_kernels`` keeps them; sLSTM ``s`` [B, 4, D] (h, c, n, m)."""

    tensors: dict = field(default_factory=dict)
    pos: torch.Tensor | None = None  # [B] tokens seen

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def index_select(self, index):
        return XLSTMBlockState({k: t.index_select(0, index) for k, t in self.tensors.items()}, self.pos.index_select(0, index))

    @staticmethod
    def cat(states):
        keys = states[0].tensors.keys()
        return XLSTMBlockState({k: torch.cat([s.tensors[k] for s in states]) for k in keys},
                               torch.cat([s.pos for s in states]))


# ---- the blocks ---------------------------------------------------------------------------------

def _triton_head_dims_ok(*dims: int) -> bool:
    # mlstm_kernels' Triton kernels tile head dimensions in powers of two; other sizes (SmolLM2's
    # mLSTM heads are 96 wide) gave wrong decoding steps on an H100, so they take the native kernels
    return all(d >= 16 and d & (d - 1) == 0 for d in dims)


def _kernel_names(cfg: DistilXLSTMConfig, device: torch.device, dqk: int, dv: int) -> tuple[str, str]:
    """(chunkwise kernel, step kernel) for tensors on ``device`` with these head dimensions."""
    triton_ok = device.type == "cuda" and _triton_head_dims_ok(dqk, dv)
    if cfg.mlstm_kernel != "auto":
        return cfg.mlstm_kernel, ("triton" if "triton" in cfg.mlstm_kernel and triton_ok else "native")
    if triton_ok:
        return "chunkwise--triton_limit_chunk", "triton"
    return "chunkwise--native_autograd", "native"


def mlstm_sequence(q, k, v, i, f, state: dict | None, cfg: DistilXLSTMConfig, eps: float = 1e-6):
    """The mLSTM cell over a sequence through ``mlstm_kernels``: q, k [B, H, S, Dqk], v [B, H, S, Dv],
    i, f [B, H, S] gate pre-activations, ``state`` (c, n, m) or None -> (h [B, H, S, Dv], (c, n, m)).
    A single step with a state uses the step kernel; anything else the chunkwise kernel, padded."""
    from mlstm_kernels.torch import get_mlstm_kernel, get_mlstm_step_kernel

    chunkwise, step = _kernel_names(cfg, q.device, q.shape[-1], v.shape[-1])
    B, H, S, _ = q.shape
    if S == 1 and state is not None:
        # one-token slices and the chunkwise kernels' states may be strided; the step kernels get
        # contiguous buffers (the Triton one is written for them)
        c, n, m = (state[key].contiguous() for key in ("c", "n", "m"))
        h, (c, n, m) = get_mlstm_step_kernel(step)(
            q=q[:, :, 0].contiguous(), k=k[:, :, 0].contiguous(), v=v[:, :, 0].contiguous(), i=i.contiguous(),
            f=f.contiguous(), c=c, n=n, m=m, eps=eps)
        return h[:, :, None].to(q.dtype), {"c": c, "n": n, "m": m}
    pad = (-S) % cfg.chunk_size
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        i = F.pad(i, (0, pad), value=_PAD_INPUT_GATE)
        f = F.pad(f, (0, pad), value=_PAD_FORGET_GATE)
    initial = (state["c"], state["n"], state["m"]) if state is not None else (None, None, None)
    h, (c, n, m) = get_mlstm_kernel(chunkwise)(q=q, k=k, v=v, i=i, f=f, c_initial=initial[0], n_initial=initial[1],
                                               m_initial=initial[2], return_last_states=True, eps=eps,
                                               chunk_size=cfg.chunk_size)
    return h[:, :, :S], {"c": c, "n": n, "m": m}


def _conv_state(layer_conv, x: torch.Tensor, state: XLSTMBlockState | None) -> torch.Tensor:
    if state is not None:
        return state.tensors["conv"]
    return x.new_zeros(x.shape[0], layer_conv.pad, x.shape[-1])


def mlstm_block_forward(block, x: torch.Tensor, state: XLSTMBlockState | None, cfg: DistilXLSTMConfig):
    """An ``xlstm`` mLSTM block (pre-norm, up-projection, conv, q/k/v, cell, skip, output gate,
    down-projection, residual) with its cell computed by ``mlstm_sequence``; returns (x, tensors)."""
    layer, cell = block.xlstm, block.xlstm.mlstm_cell
    B, S, _ = x.shape
    inner = layer.proj_up(block.xlstm_norm(x))
    x_mlstm, z = torch.split(inner, layer.config._inner_embedding_dim, dim=-1)
    x_conv, conv = layer.conv1d(x_mlstm, _conv_state(layer.conv1d, x_mlstm, state), return_last_state=True)
    x_act = layer.conv_act_fn(x_conv)
    q, k, v = layer.q_proj(x_act), layer.k_proj(x_act), layer.v_proj(x_mlstm)
    gates_in = torch.cat([q, k, v], dim=-1)
    i, f = cell.igate(gates_in).transpose(1, 2), cell.fgate(gates_in).transpose(1, 2)  # [B, H, S]
    heads = cell.config.num_heads
    q, k, v = (t.view(B, S, heads, -1).transpose(1, 2) for t in (q, k, v))
    cell_state = None if state is None else {key: state.tensors[key] for key in ("c", "n", "m")}
    h, cell_state = mlstm_sequence(q, k, v, i, f, cell_state, cfg)
    h = cell.outnorm(h.to(x.dtype)).transpose(1, 2).reshape(B, S, -1)
    y = layer.dropout(layer.proj_down((h + layer.learnable_skip * x_act) * layer.ogate_act_fn(z)))
    return x + y, {"conv": conv, **cell_state}


def slstm_block_forward(block, x: torch.Tensor, state: XLSTMBlockState | None):
    """An ``xlstm`` sLSTM block (pre-norm, sLSTM layer with its cell kernel, residual, gated
    feed-forward), carrying the convolution and cell states; returns (x, tensors)."""
    layer = block.xlstm
    h = block.xlstm_norm(x)
    cell_state = None if state is None else state.tensors["s"].transpose(0, 1).contiguous()
    y, new = layer(h, conv_state=_conv_state(layer.conv1d, h, state), slstm_state=cell_state, return_last_state=True)
    x = x + y
    if block.ffn is not None:
        x = x + block.ffn(block.ffn_norm(x))
    return x, {"conv": new["conv_state"], "s": new["slstm_state"].transpose(0, 1)}


# ---- the student -----------------------------------------------------------------------------------

# Each sLSTM kernel stores its recurrent kernel and bias in its own internal layout (vanilla
# [H, 4*Dh, Dh], CUDA [H, Dh, 4*Dh], biases permuted alike). Saved students, checkpoints and merges
# always hold the package's external layout ([H, Dh, 4, Dh] and [H, 4, Dh]), converted by the cell's
# own int2ext / ext2int functions, so a student trained with one kernel loads with the other.
_SLSTM_PARAMS = (("_recurrent_kernel_", "_recurrent_kernel_int2ext", "_recurrent_kernel_ext2int"),
                 ("_bias_", "_bias_int2ext", "_bias_ext2int"))


def _slstm_to_external_layout(cell, state_dict, prefix, local_metadata):
    for name, to_ext, _ in _SLSTM_PARAMS:
        if prefix + name in state_dict:
            state_dict[prefix + name] = getattr(cell, to_ext)(state_dict[prefix + name]).contiguous()


def _slstm_from_external_layout(cell, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                error_msgs):
    internal = dict(cell.named_parameters(recurse=False))
    for name, _, to_int in _SLSTM_PARAMS:
        key = prefix + name
        if key in state_dict and tuple(state_dict[key].shape) != tuple(internal[name].shape):
            state_dict[key] = getattr(cell, to_int)(state_dict[key]).contiguous()


def _stack_config(model_config, cfg: DistilXLSTMConfig, dtype: torch.dtype):
    from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig, sLSTMLayerConfig,
                       xLSTMBlockStackConfig)

    width, heads = model_config.hidden_size, cfg.num_heads
    if width % heads:
        raise ValueError(f"the teacher's hidden_size {width} is not divisible by {heads} xLSTM heads "
                         f"(roundup({model_config.num_attention_heads}, 4)); set distil_xlstm.num_heads to a divisor "
                         f"of {width}")
    has_mlstm = len(cfg.slstm_at) < cfg.num_blocks
    mlstm = None
    if has_mlstm:
        layer = mLSTMLayerConfig(conv1d_kernel_size=cfg.conv1d_kernel_size, qkv_proj_blocksize=cfg.qkv_proj_blocksize,
                                 num_heads=heads, proj_factor=cfg.mlstm_proj_factor, embedding_dim=width)
        inner = layer._inner_embedding_dim
        if inner % heads or inner % cfg.qkv_proj_blocksize:
            raise ValueError(f"the mLSTM inner width {inner} (hidden_size {width} x mlstm_proj_factor "
                             f"{cfg.mlstm_proj_factor}, rounded up to 64) must be divisible by num_heads={heads} and "
                             f"qkv_proj_blocksize={cfg.qkv_proj_blocksize}; change one of them")
        mlstm = mLSTMBlockConfig(mlstm=layer)
    slstm = None
    if cfg.slstm_at:
        dtype_name = str(dtype).replace("torch.", "")
        backend = "vanilla" if cfg.slstm_backend == "auto" else cfg.slstm_backend
        slstm = sLSTMBlockConfig(
            slstm=sLSTMLayerConfig(backend=backend, num_heads=heads, conv1d_kernel_size=cfg.conv1d_kernel_size,
                                   bias_init="powerlaw_blockdependent", dtype=dtype_name, embedding_dim=width),
            feedforward=FeedForwardConfig(proj_factor=cfg.slstm_ffn_proj_factor, act_fn="gelu"))
    # context_length only sizes a causal-mask buffer of the package's quadratic mLSTM form, which
    # this student does not use (the buffer is dropped after construction)
    return xLSTMBlockStackConfig(mlstm_block=mlstm, slstm_block=slstm, context_length=cfg.chunk_size,
                                 num_blocks=cfg.num_blocks, embedding_dim=width, slstm_at=list(cfg.slstm_at))


class DistilXLSTMStudent(StudentLM):
    """Causal LM: the teacher's embedding -> xLSTM blocks -> final norm -> the teacher's LM head.

    ``student(input_ids, attention_mask=None).logits`` is [B, T, vocab] like a Hugging Face causal
    LM; ``decode_state`` (``new_decode_state()``) turns on stateful prefill and recurrent steps
    (``models.generate``). ``config`` is the teacher's model config (vocabulary, special tokens).
    """

    family = "distil_xlstm"

    def __init__(self, model_config, cfg: DistilXLSTMConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        from xlstm import xLSTMBlockStack

        cfg = cfg.resolved(model_config)
        self._model_config = model_config
        self.distil_config = cfg
        width = model_config.hidden_size
        self.embed_tokens = nn.Embedding(model_config.vocab_size, width, dtype=dtype)
        self.backbone = xLSTMBlockStack(_stack_config(model_config, cfg, dtype)).to(dtype)
        for block in self.backbone.blocks:
            cell = getattr(block.xlstm, "mlstm_cell", None)
            if cell is not None:
                cell.causal_mask = None
            cell = getattr(block.xlstm, "slstm_cell", None)
            if cell is not None:
                cell.register_state_dict_post_hook(_slstm_to_external_layout)
                cell.register_load_state_dict_pre_hook(_slstm_from_external_layout)
        self.lm_head = nn.Linear(width, model_config.vocab_size, bias=False, dtype=dtype)
        if getattr(model_config, "tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def skeleton(cls, model_config, family_config: DistilXLSTMConfig,
                 dtype: torch.dtype = torch.float32) -> "DistilXLSTMStudent":
        return cls(model_config, family_config, dtype)

    @property
    def config(self):
        return self._model_config

    @property
    def family_config(self) -> DistilXLSTMConfig:
        return self.distil_config

    @property
    def num_layers(self) -> int:
        return len(self.backbone.blocks)

    def block_kinds(self) -> list[str]:
        return ["slstm" if i in self.distil_config.slstm_at else "mlstm" for i in range(self.num_layers)]

    def describe(self) -> str:
        kinds = self.block_kinds()
        return (f"distil_xlstm, {len(kinds)} blocks ({kinds.count('slstm')} sLSTM, {kinds.count('mlstm')} mLSTM), "
                f"{self.distil_config.num_heads} heads")

    def new_parameters(self):
        """(name, parameter) pairs the teacher did not provide: everything but embedding and head."""
        for name, p in self.backbone.named_parameters():
            yield f"backbone.{name}", p

    def copied_parameters(self):
        """The teacher's embedding and LM head (one tensor when they are tied)."""
        yield "embed_tokens.weight", self.embed_tokens.weight
        if self.lm_head.weight is not self.embed_tokens.weight:
            yield "lm_head.weight", self.lm_head.weight

    @property
    def head(self) -> nn.Linear:
        return self.lm_head

    def _body(self, input_ids, decode_state, output_hidden_states: bool,
              position_ids=None):  # no positions: the recurrence orders the tokens
        x = self.embed_tokens(input_ids)
        hidden = [x] if output_hidden_states else None
        for idx, (block, kind) in enumerate(zip(self.backbone.blocks, self.block_kinds())):
            state = decode_state.layers[idx] if decode_state is not None else None
            if kind == "slstm":
                x, tensors = slstm_block_forward(block, x, state)
            else:
                x, tensors = mlstm_block_forward(block, x, state, self.distil_config)
            if decode_state is not None:
                pos = state.pos if state is not None else input_ids.new_zeros(input_ids.shape[0])
                decode_state.layers[idx] = XLSTMBlockState(tensors, pos + input_ids.shape[1])
            if output_hidden_states:
                hidden.append(x)
        return self.backbone.post_blocks_norm(x), hidden


def distil_xlstm_from_teacher(teacher: nn.Module, cfg: DistilXLSTMConfig | None = None) -> DistilXLSTMStudent:
    """A new Distil-xLSTM student for ``teacher`` (left untouched): fresh xLSTM blocks, the teacher's
    embedding and LM head copied (and frozen when ``cfg.freeze_embeddings``)."""
    cfg = cfg or DistilXLSTMConfig()
    if not isinstance(cfg, DistilXLSTMConfig):
        raise TypeError(f"cfg must be a models.DistilXLSTMConfig, got {type(cfg).__name__}")
    get_adapter(teacher.config)  # a supported family, or a clear error
    base = decoder_stack(teacher)
    dtype = base.embed_tokens.weight.dtype
    student = DistilXLSTMStudent(teacher.config.__class__.from_dict(teacher.config.to_dict()), cfg, dtype)
    with torch.no_grad():
        student.embed_tokens.weight.copy_(base.embed_tokens.weight)
        if student.lm_head.weight is not student.embed_tokens.weight:
            student.lm_head.weight.copy_(teacher.lm_head.weight)
    if cfg.freeze_embeddings:
        for _, p in student.copied_parameters():
            p.requires_grad_(False)
    student.teacher_fingerprint = teacher_fingerprint(teacher)
    student.train(teacher.training)
    return student


def parameter_counts(student: DistilXLSTMStudent) -> dict:
    """Total, trainable and copied parameter counts (tied tensors counted once, as ``parameters()`` yields them)."""
    total = sum(p.numel() for p in student.parameters())
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    copied = sum(p.numel() for _, p in student.copied_parameters())
    return {"total": total, "trainable": trainable, "copied": copied,
            "trainable_fraction": trainable / total if total else math.nan}
