"""Teachers, the hybrid student and its decoding: plain ``nn.Module`` code, no Lightning."""

from .adapters import SUPPORTED_FAMILIES, get_adapter
from .checkpoint import load_student, save_student
from .config import HybridConfig
from .distil_xlstm import DistilXLSTMConfig, DistilXLSTMStudent, distil_xlstm_from_teacher
from .generation import generate, prefill
from .hybrid_layer import FullAttention, HybridAttention
from .state import DecodeState, KVCacheState
from .student import HybridCausalLMOutput, HybridStudent, StudentLM, convert_to_hybrid
from .teacher import EMBEDDED_TEACHER, embedded_teacher_dir, load_teacher, load_tokenizer

__all__ = [
    "EMBEDDED_TEACHER", "SUPPORTED_FAMILIES", "DecodeState", "DistilXLSTMConfig", "DistilXLSTMStudent",
    "FullAttention", "HybridAttention", "StudentLM", "distil_xlstm_from_teacher",
    "HybridCausalLMOutput", "HybridConfig", "HybridStudent", "KVCacheState", "convert_to_hybrid",
    "embedded_teacher_dir", "generate", "get_adapter", "load_student",
    "load_teacher", "load_tokenizer", "prefill", "save_student",
]
