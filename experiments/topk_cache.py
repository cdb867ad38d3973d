"""Run the teacher once over the training blocks and cache its top-k distribution.

    python -m experiments.topk_cache --config configs/data/example.yaml --teacher smollm2-135m-instruct --k 64 --out runs/topk/example
    python -m experiments.run fit --config configs/stages/kd.yaml --config configs/data/example.yaml --data.topk_cache runs/topk/example

The data options are the training run's own (``--config`` takes the same data YAML), so the
cache holds exactly the blocks the KD stage trains on. An interrupted build resumes.
"""

from __future__ import annotations

import time

import torch
from jsonargparse import ArgumentParser, ActionConfigFile

from datamodules import TextDataModule
from datamodules.topk_cache import write_topk_cache
from models import load_teacher


def build(data: TextDataModule, teacher: str, k: int, out: str, batch_size: int = 8, shard_blocks: int = 256,
          dtype: str = "float32") -> str:
    data.topk_cache = None
    data.setup("fit")
    model = load_teacher(teacher, dtype=getattr(torch, dtype))
    blocks = data.train_set.tensors
    started = time.perf_counter()
    path = write_topk_cache(model, data.tokenizer, blocks["input_ids"], blocks["labels"], k, out,
                            shard_blocks=shard_blocks, batch_size=batch_size)
    tokens = blocks["input_ids"].numel()
    print(f"top-{k} cache of {len(blocks['input_ids'])} blocks ({tokens:,} tokens) written to {path} "
          f"in {time.perf_counter() - started:.1f}s")
    return str(path)


def main(args=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0], parser_mode="omegaconf")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(TextDataModule, "data")
    parser.add_argument("--teacher", type=str, default="smollm2-135m-instruct", help="teacher that fills the cache")
    parser.add_argument("--k", type=int, default=64, help="teacher tokens kept per position")
    parser.add_argument("--out", type=str, required=True, help="cache folder")
    parser.add_argument("--batch_size", type=int, default=8, help="blocks per teacher forward")
    parser.add_argument("--shard_blocks", type=int, default=256, help="blocks per shard file")
    parser.add_argument("--dtype", type=str, default="float32", help="teacher dtype")
    parser.link_arguments("teacher", "data.tokenizer")  # the blocks are tokenised by the teacher, as in training
    cfg = parser.parse_args(args)
    init = parser.instantiate_classes(cfg)
    return build(init.data, cfg.teacher, cfg.k, cfg.out, cfg.batch_size, cfg.shard_blocks, cfg.dtype)


if __name__ == "__main__":
    main()
