"""TextDataModule: corpora -> tokenised, packed blocks for every stage (DESIGN §2).

- Sources are Hugging Face datasets (hub names, or local json/jsonl/parquet/txt files); plain
  text or chat (assistant-only loss); several sources form a weighted mixture.
- Documents are split into train/validation deterministically (seed), tokenised with the
  teacher's tokenizer, packed into ``seq_len`` blocks with EOS separators, and cached on disk
  (safetensors, keyed by a fingerprint of sources, tokenizer and options) so a second run does
  not tokenise again. ``streaming=True`` packs on the fly for corpora larger than memory.
- With ``topk_cache`` the training blocks (and the teacher's top-k) come from a cache written by
  ``python -m experiments.topk_cache``; its fingerprint must match this tokenizer.
Batches are dicts: ``input_ids`` [B, L], ``labels`` [B, L] (IGNORE where no loss applies), and
with a cache ``topk_ids`` / ``topk_logprobs`` [B, L, k].
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path

import lightning as L
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset

from models.storage import ArtifactMismatch, atomic_file_write, verify_file

from .loader import ResumableDataLoader
from .sources import DataSource, record_verdict
from .tokenization import encode_chat, encode_text, pack, tokenizer_fingerprint


class BlockDataset(Dataset):
    """Dict-of-tensors dataset: item i is {name: tensor[i]}."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        sizes = {len(t) for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"block tensors disagree on length: { {k: len(t) for k, t in tensors.items()} }")
        self.tensors = tensors

    def __len__(self):
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i):
        return {k: t[i] for k, t in self.tensors.items()}


def _examples(source: DataSource, records, tokenizer, keep):
    """Encoded documents of the kept records; a record this source cannot use is named by its index
    (local json/jsonl files were checked line by line before: ``sources.scan_local_file``)."""
    field = source.text_field if source.format == "text" else source.messages_field
    for index, record in enumerate(records):
        if not keep(index):
            continue
        verdict, problem = record_verdict(record, source)
        if verdict == "refused":
            raise ValueError(f"data source {source.label!r} ({source.path}), record {index}: {problem}")
        if verdict != "usable":
            continue
        if source.format == "text":
            yield encode_text(tokenizer, record[field])
        else:
            yield encode_chat(tokenizer, record[field])


def balanced_validation(per_source: list[dict], cap: int | None) -> dict[str, torch.Tensor]:
    """The validation blocks of every source; under a cap, an equal share of each source (a source
    with fewer blocks gives what it has), spread evenly through its held-out text. Taking the first
    ``cap`` blocks in source order would score one long document of the first source."""
    picked = []
    sizes = [len(b["val_input_ids"]) for b in per_source]
    share = sizes if cap is None else [0] * len(sizes)
    while cap is not None and sum(share) < min(cap, sum(sizes)):  # round-robin: equal shares
        for i, n in enumerate(sizes):
            if share[i] < n and sum(share) < cap:
                share[i] += 1
    for blocks, n, k in zip(per_source, sizes, share):
        index = torch.linspace(0, n - 1, k).round().long() if 0 < k < n else torch.arange(k)
        picked.append({name: blocks[f"val_{name}"][index] for name in ("input_ids", "labels")})
    return {name: torch.cat([p[name] for p in picked]) for name in ("input_ids", "labels")}


def _is_validation(seed: int, source: DataSource, index: int, val_fraction: float) -> bool:
    """Deterministic per-document split: the same document always lands on the same side."""
    digest = hashlib.sha256(f"{seed}:{source.label}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


class PackedStream(IterableDataset):
    """Streaming mixture: each source packed on the fly, sources drawn by weight (seeded)."""

    def __init__(self, sources, tokenizer, seq_len, seed, val_fraction, validation: bool):
        self.sources, self.tokenizer, self.seq_len = sources, tokenizer, seq_len
        self.seed, self.val_fraction, self.validation = seed, val_fraction, validation

    def __iter__(self):
        rng = random.Random(self.seed)
        streams = []
        for s in self.sources:
            keep = (lambda i, s=s: _is_validation(self.seed, s, i, self.val_fraction) == self.validation)
            streams.append(pack(_examples(s, s.load(streaming=True), self.tokenizer, keep), self.seq_len))
        weights = [s.weight for s in self.sources]
        while streams:
            i = rng.choices(range(len(streams)), weights=weights)[0]
            try:
                ids, labels = next(streams[i])
            except StopIteration:
                del streams[i], weights[i]
                continue
            yield {"input_ids": ids, "labels": labels}


class TextDataModule(L.LightningDataModule):
    """Tokenised, packed text and chat data for the training stages."""

    def __init__(
        self,
        tokenizer: str = "smollm2-135m-instruct",
        sources: list[DataSource] | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        max_val_blocks: int | None = 64,
        mixture_blocks: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        streaming: bool = False,
        cache_dir: str | None = None,
        topk_cache: str | None = None,
        trust_remote_code: bool = False,
    ):
        """
        Args:
            tokenizer: the teacher (hub id, folder, ``smollm2-135m-instruct``) or a student folder.
            sources: the corpora and their mixture weights.
            seq_len: tokens per block.
            batch_size: blocks per batch.
            val_fraction: share of documents held out for validation (deterministic by seed).
            max_val_blocks: cap on validation blocks, an equal share from every source (None: all).
            mixture_blocks: training blocks per epoch drawn from the weighted mixture (None: every
                block once, weights ignored); a source whose share exceeds its blocks is repeated.
            seed: split, mixture and shuffling seed.
            num_workers: DataLoader workers.
            streaming: read sources lazily and pack on the fly (no cache, no mixture_blocks).
            cache_dir: where tokenised blocks are cached (default: $XDISTILL_CACHE/data).
            topk_cache: folder written by ``experiments.topk_cache``: train on its blocks and top-k.
            trust_remote_code: allow a tokenizer that ships its own code (linked to the model's setting
                on the command line).
        """
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} is invalid; allowed values: >= 2")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} is invalid; allowed values: 0 <= val_fraction < 1")
        # refused here, when the data module is built (before any model loads), not in the DataLoader
        for key, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                  ("max_val_blocks", max_val_blocks, 1), ("mixture_blocks", mixture_blocks, 1)):
            if value is not None and (type(value) is not int or value < least):
                raise ValueError(f"data.{key}={value!r} is invalid; allowed values: an integer >= {least}"
                                 + ("" if key in ("batch_size", "num_workers") else " (or null)"))
        self.tokenizer_name, self.sources = tokenizer, list(sources or [])
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.max_val_blocks, self.mixture_blocks, self.seed = max_val_blocks, mixture_blocks, seed
        self.num_workers, self.streaming, self.topk_cache = num_workers, streaming, topk_cache
        self.trust_remote_code = trust_remote_code
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.tokenizer = None
        self.train_set = self.val_set = None

    # ---- building blocks -------------------------------------------------------------------
    def _cache_root(self) -> Path:
        from models.storage import cache_dir

        return self.cache_dir or (cache_dir() / "data")

    def _source_blocks(self, source: DataSource) -> dict[str, torch.Tensor]:
        """Train and validation blocks of one source, from the on-disk cache when present."""
        key = hashlib.sha256(json.dumps([source.fingerprint(), tokenizer_fingerprint(self.tokenizer), self.seq_len,
                                         self.seed, self.val_fraction]).encode()).hexdigest()[:20]
        path = self._cache_root() / f"{source.label}-{key}.safetensors"
        if path.is_file():
            # A derived cache: one that does not verify (damaged, or cut short before its sidecar) is
            # rebuilt from the source, saying why, rather than trained on or refused.
            try:
                verify_file(path, "Rebuilding it from the source.", required=True)
                return load_file(str(path))
            except ArtifactMismatch as err:
                warnings.warn(f"tokenised-data cache: {err}")
            except (SafetensorError, OSError) as err:
                warnings.warn(f"tokenised-data cache {path} cannot be read ({err}); rebuilding it from the source")
        records = source.load()
        out = {}
        for split, want_val in (("train", False), ("val", True)):
            keep = (lambda i, v=want_val: _is_validation(self.seed, source, i, self.val_fraction) == v)
            blocks = list(pack(_examples(source, records, self.tokenizer, keep), self.seq_len))
            empty = torch.empty(0, self.seq_len, dtype=torch.long)
            out[f"{split}_input_ids"] = torch.stack([b[0] for b in blocks]) if blocks else empty
            out[f"{split}_labels"] = torch.stack([b[1] for b in blocks]) if blocks else empty
        metadata = {"source": str(source.path), "seq_len": str(self.seq_len)}
        atomic_file_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in out.items()}, str(tmp),
                                                      metadata=metadata), manifest=True)
        return out

    def _mixture(self, per_source: list[dict]) -> dict[str, torch.Tensor]:
        weights = [s.weight for s in self.sources]
        counts = [len(b["train_input_ids"]) for b in per_source]
        if self.mixture_blocks is None:
            picks = [torch.arange(c) for c in counts]
        else:
            total_w = sum(w for w, c in zip(weights, counts) if c > 0)
            g = torch.Generator().manual_seed(self.seed)
            picks = []
            for w, c in zip(weights, counts):
                want = round(self.mixture_blocks * w / total_w) if c > 0 and total_w > 0 else 0
                reps = -(-want // c) if c else 0
                order = torch.cat([torch.randperm(c, generator=g) for _ in range(reps)]) if reps else torch.empty(0, dtype=torch.long)
                picks.append(order[:want])
        ids = torch.cat([b["train_input_ids"][p] for b, p in zip(per_source, picks)])
        labels = torch.cat([b["train_labels"][p] for b, p in zip(per_source, picks)])
        source = torch.cat([torch.full((len(p),), i) for i, p in enumerate(picks)])
        return {"input_ids": ids, "labels": labels, "source": source}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from models.teacher import load_tokenizer

        if not self.sources and not self.topk_cache:
            raise ValueError("TextDataModule needs data: set data.sources (a list of DataSource) or data.topk_cache")
        self.tokenizer = load_tokenizer(self.tokenizer_name, trust_remote_code=self.trust_remote_code)
        if self.streaming:
            self.train_set = PackedStream(self.sources, self.tokenizer, self.seq_len, self.seed, self.val_fraction, False)
            self.val_set = PackedStream(self.sources, self.tokenizer, self.seq_len, self.seed, self.val_fraction, True)
            return
        per_source = [self._source_blocks(s) for s in self.sources]
        if self.topk_cache:
            from .topk_cache import read_topk_cache

            self.train_set = BlockDataset(read_topk_cache(self.topk_cache, tokenizer=self.tokenizer))
        else:
            train = self._mixture(per_source)
            if len(train["input_ids"]) < self.batch_size:
                raise ValueError(f"only {len(train['input_ids'])} training blocks of {self.seq_len} tokens, fewer than "
                                 f"batch_size={self.batch_size}: add data or lower seq_len / batch_size")
            self.train_set = BlockDataset(train)
        if per_source:
            self.val_set = BlockDataset(balanced_validation(per_source, self.max_val_blocks))

    def validation_blocks_by_source(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each source's held-out blocks ({"input_ids", "labels"}), by source label, before the
        ``max_val_blocks`` cap and without mixing (call after ``setup``; not for streaming)."""
        if self.tokenizer is None or self.streaming:
            raise ValueError("validation_blocks_by_source needs a set-up, non-streaming TextDataModule (call setup())")
        out = {}
        for source in self.sources:
            blocks = self._source_blocks(source)
            out[source.label] = {"input_ids": blocks["val_input_ids"], "labels": blocks["val_labels"]}
        return out

    # ---- loaders ---------------------------------------------------------------------------
    def train_dataloader(self):
        if isinstance(self.train_set, IterableDataset):
            return DataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, seed=self.seed,
                                   num_workers=self.num_workers, **self._replica())

    def _replica(self) -> dict:
        """This process's share of the data under data parallelism."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return {"num_replicas": 1, "rank": 0}
        kwargs = trainer.strategy.distributed_sampler_kwargs or {}
        return {"num_replicas": kwargs.get("num_replicas", trainer.world_size), "rank": kwargs.get("rank", trainer.global_rank)}

    def val_dataloader(self):
        if self.val_set is None or (not isinstance(self.val_set, IterableDataset) and len(self.val_set) == 0):
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self):
        """The held-out split (the same documents as validation)."""
        return self.val_dataloader()
