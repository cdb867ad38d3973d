"""A DataLoader whose position survives a checkpoint: Lightning stores its ``state_dict`` in the
checkpoint and hands it back on resume, so a run killed mid-epoch continues with the next batch
it would have seen (same seed, same order)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """A permutation that is a pure function of (seed, epoch), split across data-parallel ranks
    (rank r takes every world-th index, all ranks the same count); can start part-way through.
    It is a DistributedSampler so that Lightning keeps it instead of injecting its own."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self):
        per_rank = self.size // self.num_replicas
        mine = self.order()[self.rank::self.num_replicas][:per_rank]
        order, self.skip = mine[self.skip:], 0
        return iter(order)

    def __len__(self) -> int:
        return self.size // self.num_replicas


class ResumableDataLoader(DataLoader):
    """DataLoader over an ``EpochShuffleSampler`` that reports how many batches of the current
    epoch the training loop has taken."""

    def __init__(self, dataset, batch_size: int, seed: int, shuffle: bool = True, num_replicas: int = 1,
                 rank: int = 0, **kwargs):
        self.block_sampler = EpochShuffleSampler(len(dataset), seed, shuffle, num_replicas, rank)
        super().__init__(dataset, batch_size=batch_size, sampler=self.block_sampler, drop_last=True, **kwargs)
        self.batches_taken = 0

    def __iter__(self):
        skipped = self.block_sampler.skip // self.batch_size
        self.batches_taken = skipped
        for batch in super().__iter__():
            self.batches_taken += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.block_sampler.epoch, "batches": self.batches_taken}

    def load_state_dict(self, state: dict) -> None:
        self.block_sampler.set_epoch(int(state["epoch"]))
        self.block_sampler.skip = int(state["batches"]) * self.batch_size
