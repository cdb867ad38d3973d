"""Teacher top-k cache: the teacher runs once over the training blocks and its top-k token ids
and log-probabilities are written in safetensors shards with a manifest. ``SparseKDModule`` then
trains without running the teacher. The manifest's fingerprint (teacher, tokenizer, data, k) is
checked on every read: a cache made for another tokenizer or teacher is refused, never misused.

Layout: <out>/manifest.json and <out>/shard-00000.safetensors, ... (input_ids, labels [N, L] int64,
topk_ids [N, L, k] int32, topk_logprobs [N, L, k] float32). Shards are written atomically, each with
its size and SHA-256 in a sidecar; a rerun skips the shards that verify, so an interrupted build
resumes. The manifest, written last, records every shard's size and SHA-256; readers check each
shard against it and refuse one that differs, naming it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.storage import (
    ArtifactMismatch, atomic_file_write, check_file, read_manifest as read_file_manifest, verify_file,
    write_json,
)
from models.teacher import teacher_fingerprint

from .tokenization import tokenizer_fingerprint

MANIFEST = "manifest.json"
FORMAT = "xdistill-topk-cache"


def data_fingerprint(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.numpy().tobytes()).hexdigest()[:16]


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


@torch.no_grad()
def write_topk_cache(teacher, tokenizer, input_ids: torch.Tensor, labels: torch.Tensor, k: int, out,
                     *, shard_blocks: int = 256, batch_size: int = 8) -> Path:
    """Run ``teacher`` over the blocks [N, L] and write the cache folder ``out``."""
    from models.targets import teacher_topk

    vocab = teacher.config.vocab_size
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} is invalid; allowed values: 1..{vocab} (the teacher's vocabulary size)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {"teacher": teacher_fingerprint(teacher), "tokenizer": tokenizer_fingerprint(tokenizer),
                   "data": data_fingerprint(input_ids), "k": k, "seq_len": int(input_ids.shape[1])}
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") != fingerprint:
            raise ValueError(f"{manifest_path} belongs to another cache ({old.get('fingerprint')}); "
                             f"choose an empty folder or delete it")
    n_shards = -(-len(input_ids) // shard_blocks)
    device = next(teacher.parameters()).device
    teacher.eval()
    for s in range(n_shards):
        path = out / _shard_name(s)
        if path.is_file():
            try:
                if verify_file(path, "", required=True):
                    continue
            except ArtifactMismatch as err:  # cut short between the rename and its sidecar, or damaged since
                warnings.warn(f"top-k cache: rebuilding {path.name}: {err}")
        lo, hi = s * shard_blocks, min((s + 1) * shard_blocks, len(input_ids))
        ids_list, lp_list = [], []
        for b in range(lo, hi, batch_size):
            logits = teacher(input_ids[b: min(b + batch_size, hi)].to(device)).logits
            ids, lp = teacher_topk(logits, k)
            ids_list.append(ids.to(torch.int32).cpu())
            lp_list.append(lp.cpu())
        tensors = {"input_ids": input_ids[lo:hi].contiguous(), "labels": labels[lo:hi].contiguous(),
                   "topk_ids": torch.cat(ids_list), "topk_logprobs": torch.cat(lp_list)}
        atomic_file_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}), manifest=True)
    shards = [_shard_name(s) for s in range(n_shards)]
    files = {name: read_file_manifest(out / name)["files"][name] for name in shards}
    manifest = {"format": FORMAT, "fingerprint": fingerprint, "shards": shards, "blocks": int(len(input_ids)),
                "files": files}
    write_json(manifest_path, manifest)
    return out


def read_manifest(path) -> dict:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} is missing: {path} is not a finished top-k cache "
                                "(build it with python -m experiments.topk_cache)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def check_fingerprint(path, *, tokenizer=None, teacher=None) -> dict:
    """Refuse a cache made for another tokenizer or teacher, naming which."""
    manifest = read_manifest(path)
    fp = manifest["fingerprint"]
    if tokenizer is not None and fp["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"top-k cache {path} was made with another tokenizer (fingerprint {fp['tokenizer']}, "
                         f"this one is {tokenizer_fingerprint(tokenizer)}); rebuild the cache for this teacher")
    if teacher is not None and fp["teacher"] != teacher_fingerprint(teacher):
        raise ValueError(f"top-k cache {path} was made with another teacher (fingerprint {fp['teacher']}, "
                         f"this one is {teacher_fingerprint(teacher)}); rebuild the cache for this teacher")
    return manifest


def read_topk_cache(path, *, tokenizer=None, teacher=None) -> dict[str, torch.Tensor]:
    """All shards of a cache as one dict of tensors, after checking its fingerprint."""
    manifest = check_fingerprint(path, tokenizer=tokenizer, teacher=teacher)
    parts = []
    recorded = manifest.get("files")  # None: a cache built before shards were recorded (read unverified)
    for name in manifest["shards"]:
        shard = Path(path) / name
        if recorded is not None:
            try:
                check_file(shard, recorded.get(name, {}), Path(path) / MANIFEST,
                           f"Delete {shard} and rerun the command that built the cache (python -m "
                           "experiments.topk_cache, same arguments): it rebuilds that shard and keeps the others")
            except ArtifactMismatch as err:
                raise ValueError(f"top-k cache: {err}") from None
        try:
            parts.append(load_file(str(shard)))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{shard} cannot be read ({err}); the file is truncated or corrupt, delete it and "
                             "rerun the cache command to rebuild it") from err
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
