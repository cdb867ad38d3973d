"""Merging domain experts into one student (DESIGN §4): model soup, task arithmetic, TIES.

``merge_students`` does the work tensor by tensor in float32, reading each expert's safetensors
lazily, so memory stays near one student's size; the merged folder is written atomically.
``ModelMergeCallback`` runs it inside a Trainer run (before the model is built, so a ``validate``
run can score the merged student it points ``student_ckpt`` at).
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path

import lightning as L
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import load_student
from models.storage import atomic_directory_write, json_text
from models.checkpoint import (
    verify_student_folder,
    CONFIG_NAME, FAMILY_SECTIONS, WEIGHTS_NAME, read_student_settings,
    skeleton_from_folder,
)

METHODS = ("mean", "task_arithmetic", "ties")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


def _tokenizer_digest(folder: Path) -> str:
    """What decides whether two students read tokens alike: vocabulary, special tokens and chat
    template (not the files' bytes: transformers also saves load options such as local_files_only)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return "no tokenizer"
    from transformers import AutoTokenizer

    from datamodules.tokenization import tokenizer_fingerprint

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(folder)))


def _describe(folder: Path) -> dict:
    settings = read_student_settings(folder)
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {"settings": settings, "shapes": shapes, "tokenizer": _tokenizer_digest(folder)}


def check_compatible(paths: list[Path]) -> None:
    """Refuse students that cannot be merged, naming the first difference."""
    ref_path, ref = paths[0], _describe(paths[0])
    for path in paths[1:]:
        other = _describe(path)
        mine, theirs = ref["settings"], other["settings"]
        if mine.family != theirs.family:
            raise ValueError(f"cannot merge {path} with {ref_path}: one is a {theirs.family} student, the other a "
                             f"{mine.family} student")
        # (the family configs as load_student reads them: fields a folder predates are filled)
        for section, a, b in ((FAMILY_SECTIONS[mine.family], mine.family_config.to_dict(), theirs.family_config.to_dict()),
                              ("teacher_config", mine.teacher_config, theirs.teacher_config)):
            for key in sorted(set(a) | set(b)):
                if key in ("_name_or_path", "transformers_version", "architectures"):
                    continue
                if a.get(key) != b.get(key):
                    raise ValueError(f"cannot merge {path} with {ref_path}: {section}.{key} differs "
                                     f"({b.get(key)!r} vs {a.get(key)!r})")
        prints = mine.teacher_fingerprint, theirs.teacher_fingerprint
        if all(prints) and prints[0] != prints[1]:
            raise ValueError(f"cannot merge {path} with {ref_path}: they descend from different teachers (teacher "
                             f"fingerprint {prints[1]} vs {prints[0]} in their config.json), so their weights do not "
                             "share a starting point; merge experts fine-tuned from the same stage-2 student")
        if other["tokenizer"] != ref["tokenizer"]:
            raise ValueError(f"cannot merge {path} with {ref_path}: their tokenizers differ")
        keys_a, keys_b = set(ref["shapes"]), set(other["shapes"])
        if keys_a != keys_b:
            diff = sorted(keys_a ^ keys_b)[0]
            raise ValueError(f"cannot merge {path} with {ref_path}: tensor {diff!r} is in only one of them")
        for key in sorted(keys_a):
            if ref["shapes"][key] != other["shapes"][key]:
                raise ValueError(f"cannot merge {path} with {ref_path}: tensor {key!r} has shape "
                                 f"{list(other['shapes'][key])} vs {list(ref['shapes'][key])}")


TRIMS = ("global", "per_tensor")
BINS = 1 << 16


def _top_magnitude_thresholds(task_vectors, density: float) -> torch.Tensor:
    """Per expert, the k-th largest magnitude of its whole task vector (k = density x its entries),
    as TIES trims: ``task_vectors`` is a re-iterable of [E, ...] tensors, one per parameter, read
    one at a time (memory near one tensor). Exact, in two passes of 65,536-bin counts: a
    non-negative float32 orders like its bit pattern, so the high 16 bits find the bin that holds
    the k-th value and the low 16 bits of that bin's entries find the value itself."""
    def magnitude_bits(vectors: torch.Tensor) -> torch.Tensor:
        return vectors.float().abs().flatten(1).view(torch.int32).long()

    high = None
    total = 0
    for vectors in task_vectors():
        bits = magnitude_bits(vectors)
        counts = torch.stack([torch.bincount(row >> 16, minlength=BINS) for row in bits])
        high = counts if high is None else high + counts
        total += bits.shape[1]
    keep = max(1, int(round(density * total)))

    def locate(counts: torch.Tensor, need: torch.Tensor):
        # the bin (counted from the top) where the running count first reaches ``need``
        from_top = counts.flip(1).cumsum(1)
        index = (from_top >= need[:, None]).int().argmax(1)
        chosen = BINS - 1 - index
        above = from_top.gather(1, index[:, None]).squeeze(1) - counts.gather(1, chosen[:, None]).squeeze(1)
        return chosen, need - above

    experts = high.shape[0]
    high_bin, need = locate(high, torch.full((experts,), keep, dtype=torch.long))
    low = torch.zeros(experts, BINS, dtype=torch.long)
    for vectors in task_vectors():
        bits = magnitude_bits(vectors)
        for e in range(experts):
            inside = bits[e][(bits[e] >> 16) == high_bin[e]]
            low[e] += torch.bincount(inside & (BINS - 1), minlength=BINS)
    low_bin, _ = locate(low, need)
    return ((high_bin << 16) | low_bin).to(torch.int32).view(torch.float32)


def _ties(task_vectors: torch.Tensor, weights: torch.Tensor, density: float,
          thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """TIES-merging of [E, ...] task vectors: trim each expert to its top-``density`` magnitudes
    (those at or above ``thresholds[e]``, found over the whole task vector; None: within this
    tensor), elect the sign with the larger total mass, average the entries that agree with it."""
    flat = task_vectors.flatten(1)
    if thresholds is None:
        keep = max(1, int(round(density * flat.shape[1])))
        if keep < flat.shape[1]:
            thresholds = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1).values
    if thresholds is not None:
        flat = torch.where(flat.abs() >= thresholds[:, None], flat, torch.zeros_like(flat))
    weighted = flat * weights[:, None]
    sign = torch.sign(weighted.sum(0))
    agree = (torch.sign(flat) == sign) & (flat != 0)
    total = (weighted * agree).sum(0)
    count = (weights[:, None] * agree).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1e-12), torch.zeros_like(total)).view_as(task_vectors[0])


def merge_students(paths, method: str = "mean", weights=None, base=None, out=None, *, scale: float = 1.0,
                   density: float = 0.2, trim: str = "global"):
    """Merge expert students saved by ``models.save_student``.

    Args:
        paths: the expert folders.
        method: ``mean`` (uniform or weighted model soup), ``task_arithmetic``
            (base + scale * sum_i w_i (expert_i - base)) or ``ties`` (trim to ``density``, elect sign,
            disjoint mean of the task vectors; base + scale * merged).
        weights: one weight per expert (default all 1; ``mean`` normalises them).
        base: the stage-2 student the experts started from (task_arithmetic and ties).
        out: folder for the merged student (written atomically); None keeps it in memory only.
        scale: lambda of task arithmetic / TIES.
        density: share of each task vector TIES keeps.
        trim: ``global`` (TIES as published: the top-``density`` magnitudes of each expert's whole
            task vector, so a layer that changed more keeps more) or ``per_tensor`` (the same share
            of every tensor).
    Returns:
        the merged student (of the experts' family).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; allowed values: {', '.join(METHODS)}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("merge_students needs at least one expert folder")
    if method != "mean" and base is None:
        raise ValueError(f"method={method!r} needs base: the stage-2 student the experts were fine-tuned from")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise ValueError(f"{len(weights)} weights for {len(paths)} experts; give one weight per expert")
    if method == "mean" and sum(weights) <= 0:
        raise ValueError(f"weights={weights} must sum to a positive number for method='mean'")
    if not 0 < density <= 1:
        raise ValueError(f"density={density} is invalid; allowed values: 0 < density <= 1")
    if trim not in TRIMS:
        raise ValueError(f"trim={trim!r} is not supported; allowed values: {', '.join(TRIMS)}")
    folders = paths + ([Path(base)] if base is not None else [])
    check_compatible(folders)
    for folder in folders:  # every byte merged is the byte each expert was saved with
        verify_student_folder(folder)
    w = torch.tensor(weights, dtype=torch.float32)
    merged: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(p / WEIGHTS_NAME), framework="pt")) for p in folders]
        experts, base_file = files[: len(paths)], (files[-1] if base is not None else None)
        thresholds = None
        if method == "ties" and trim == "global" and density < 1:
            def task_vectors():
                for key in experts[0].keys():
                    origin = base_file.get_tensor(key).float()
                    yield torch.stack([f.get_tensor(key).float() for f in experts]) - origin

            thresholds = _top_magnitude_thresholds(task_vectors, density)
        for key in experts[0].keys():
            dtype = experts[0].get_slice(key).get_dtype()
            stacked = torch.stack([f.get_tensor(key).float() for f in experts])
            if method == "mean":
                value = (stacked * w.view(-1, *[1] * (stacked.dim() - 1))).sum(0) / w.sum()
            else:
                origin = base_file.get_tensor(key).float()
                vectors = stacked - origin
                if method == "task_arithmetic":
                    delta = (vectors * w.view(-1, *[1] * (vectors.dim() - 1))).sum(0)
                else:
                    delta = _ties(vectors, w, density, thresholds)
                value = origin + scale * delta
            merged[key] = value.to(SAFETENSORS_DTYPES.get(dtype, torch.float32))
    if out is None:
        student, _ = skeleton_from_folder(paths[0])
        student.load_state_dict(merged, strict=False)  # tied weights are stored once
        return student.eval()

    provenance = {"method": method, "experts": [str(p) for p in paths], "weights": weights,
                  "base": str(base) if base is not None else None, "scale": scale, "density": density,
                  "trim": trim}

    def write(tmp: Path):
        save_file(merged, str(tmp / WEIGHTS_NAME), metadata={"format": "xdistill-hybrid-student"})
        shutil.copy(paths[0] / CONFIG_NAME, tmp / CONFIG_NAME)
        for name in TOKENIZER_FILES:
            if (paths[0] / name).is_file():
                shutil.copy(paths[0] / name, tmp / name)
        (tmp / "merge.json").write_text(json_text(provenance))

    atomic_directory_write(Path(out), write)
    return load_student(out)


class ModelMergeCallback(L.Callback):
    """Merges expert students at the start of a Trainer run (``setup``, before the model is built),
    so ``python -m experiments.run validate --config configs/stages/merge.yaml`` merges and then
    scores the merged student that ``model.student_ckpt`` points at."""

    def __init__(self, experts: list[str], out: str, method: str = "mean", weights: list[float] | None = None,
                 base: str | None = None, scale: float = 1.0, density: float = 0.2, trim: str = "global"):
        """
        Args:
            experts: expert student folders.
            out: merged student folder.
            method: mean | task_arithmetic | ties.
            weights: one weight per expert.
            base: the stage-2 student (task_arithmetic, ties).
            scale: lambda of task arithmetic / TIES.
            density: share of each task vector TIES keeps.
            trim: ``global`` (over each expert's whole task vector) or ``per_tensor``.
        """
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not supported; allowed values: {', '.join(METHODS)}")
        self.experts, self.out, self.method = experts, out, method
        self.weights, self.base, self.scale, self.density, self.trim = weights, base, scale, density, trim

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:
            merge_students(self.experts, self.method, self.weights, self.base, self.out, scale=self.scale,
                           density=self.density, trim=self.trim)
        trainer.strategy.barrier("model-merge")
