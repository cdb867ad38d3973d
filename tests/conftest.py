import os

import torch

# Triton picks compiled or interpreted execution when a kernel is decorated, i.e. when its module is
# first imported, and any test (the benchmarks' mlstm_kernels rows, the hybrid layer with
# backend="triton") may import Triton modules: so the interpreter is chosen here, before anything
# else loads. Without CUDA the Triton kernels run in Triton's CPU interpreter (slow, small shapes);
# with CUDA they compile, and tests/kernels/test_triton.py runs them on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after the Triton mode is chosen)
import transformers as tf  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=1024, rope_theta=10000.0)

FAMILIES = {
    "llama": (tf.LlamaConfig, {}),
    "mistral": (tf.MistralConfig, {"sliding_window": None}),
    "qwen2": (tf.Qwen2Config, {}),
    "qwen3": (tf.Qwen3Config, {"head_dim": 16}),
    "olmo2": (tf.Olmo2Config, {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}),
}


def make_teacher(family: str = "llama", seed: int = 0, init_std: float = 0.2, **overrides):
    """A tiny random teacher (2 layers, hidden 64, 4 query / 2 kv heads) built from a transformers
    config. A large init std makes attention far from uniform, so equality tests are not trivial."""
    cls, extra = FAMILIES[family]
    kwargs = {**TINY, **extra, "initializer_range": init_std, **overrides}
    config = cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # q/k/v biases are zero-initialised by HF; make them non-zero so the student must copy them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture
def tiny_teacher():
    return make_teacher("llama")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
