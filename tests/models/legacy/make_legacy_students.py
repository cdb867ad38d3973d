"""How the legacy student folders beside this file were made: run at commit c08f7a9 (before
``feature_map``, ``memory_norm`` and ``gate_input`` existed), from the repository root:

    python -m tests.models.legacy.make_legacy_students

Each folder holds a tiny student saved by that code with non-trivial gates and norm weights,
and ``expected.safetensors``: the input ids and the logits that code gave for them. The test
``tests/models/test_legacy_students.py`` loads the folders with today's code and requires the
same logits. Do not re-run it with newer code: the point is what the old code computed.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from models import HybridConfig, convert_to_hybrid, save_student
from tests.conftest import make_teacher

HERE = Path(__file__).parent
CASES = {
    "hybrid_gate": dict(layers=2, cfg=HybridConfig(mode="hybrid", combine="gate", window=8, sink_tokens=2, chunk_size=16)),
    "mlstm": dict(layers=1, cfg=HybridConfig(mode="mlstm", window=8, sink_tokens=2, chunk_size=16)),
    "shared_norm": dict(layers=1, cfg=HybridConfig(mode="hybrid", combine="shared_norm", window=8, sink_tokens=2,
                                                   chunk_size=16)),
}


def main():
    for name, case in CASES.items():
        teacher = make_teacher("llama", num_hidden_layers=case["layers"], intermediate_size=64)
        student = convert_to_hybrid(teacher, case["cfg"]).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # gates and norms as training would leave them: not at their init
            for _, p in student.new_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        save_student(student, HERE / name)
        ids = torch.randint(0, 97, (2, 37), generator=g)
        with torch.no_grad():
            logits = student(ids).logits
        save_file({"input_ids": ids, "logits": logits.contiguous()}, str(HERE / name / "expected.safetensors"))
        print(name, tuple(logits.shape))


if __name__ == "__main__":
    main()
