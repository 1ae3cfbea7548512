"""An endless, resumable sampler: the index at every position is a pure function of (seed, position)."""

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

# Mixes the seed and the epoch into one generator seed; a large prime keeps (seed, epoch) pairs apart.
_SEED_STRIDE = 1_000_003
_UINT64_MASK = (1 << 64) - 1


class InfiniteSampler(Sampler[int]):
    """Yields dataset indices forever, reshuffled each epoch, starting at position `start`.

    Data parallelism: with `world_size` > 1, the stream is the same on every rank and is dealt out in chunks
    of `chunk` (the per-rank batch): position p goes to rank (p // chunk) % world_size. So the ranks' batches
    of one step together are exactly the global batch a single process would take at that step.
    """

    def __init__(
        self, num_items: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1, chunk: int = 1
    ) -> None:
        if num_items <= 0:
            raise ValueError(f"InfiniteSampler needs num_items > 0, got {num_items}")
        if start < 0:
            raise ValueError(f"InfiniteSampler needs start >= 0, got {start}")
        if not 0 <= rank < world_size or chunk < 1:
            raise ValueError(f"InfiniteSampler needs 0 <= rank < world_size and chunk >= 1, got {rank}, {world_size}")
        self.num_items = num_items
        self.seed = seed
        self.start = start
        self.rank = rank
        self.world_size = world_size
        self.chunk = chunk

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of indices used in `epoch`."""
        # A private generator, so the global torch RNG (and thus the training run) is never disturbed.
        generator = torch.Generator().manual_seed((self.seed * _SEED_STRIDE + epoch) & _UINT64_MASK)
        return torch.randperm(self.num_items, generator=generator)

    def _stream(self) -> Iterator[int]:
        """Every rank's indices, from position `start` on."""
        epoch, offset = divmod(self.start, self.num_items)
        while True:
            yield from self.epoch_order(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        # Each iter() restarts at `start`, so a DataLoader re-created after a resume sees the same stream.
        if self.world_size == 1:
            yield from self._stream()
            return
        for position, index in enumerate(self._stream(), start=self.start):
            if (position // self.chunk) % self.world_size == self.rank:
                yield index
