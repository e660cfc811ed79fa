"""The global sample order every batch source shares (pretraining windows, SFT rows, DPO pairs).

A global batch is G samples; rank r's m-th micro-batch of step s (b samples each, W ranks, G / (b W) micro-batches per
step) takes global samples base + s G + (m W + r) b + [0, b). The same global batch is therefore drawn for any world
size, and the state to resume from is one integer: the samples all ranks consumed together.
"""
from __future__ import annotations


class LayoutError(ValueError):
    """seq_len / micro_batch / global_batch / rank / world_size that cannot work together."""


class SampleCursor:
    """Which global samples this rank's next micro-batch holds; `consumed` is the resumable state."""

    def __init__(self, micro_batch: int, global_batch: int, rank: int = 0, world_size: int = 1):
        if micro_batch < 1 or not 0 <= rank < world_size:
            raise LayoutError(f"bad layout: micro_batch={micro_batch}, rank={rank}, world_size={world_size}")
        if global_batch % (micro_batch * world_size):
            raise LayoutError(f"global_batch={global_batch} is not divisible by micro_batch={micro_batch} x "
                              f"world_size={world_size} = {micro_batch * world_size}")
        self.micro_batch, self.global_batch, self.rank, self.world_size = micro_batch, global_batch, rank, world_size
        self.grad_accum = global_batch // (micro_batch * world_size)  # micro-batches per step on each rank
        self.base, self.micro = 0, 0  # samples consumed at the last (re)start; micro-batches this rank drew since

    def first_sample(self, n: int | None = None) -> int:
        """First global sample of this rank's n-th micro-batch since the last (re)start (default: the next one)."""
        step, m = divmod(self.micro if n is None else n, self.grad_accum)
        return self.base + step * self.global_batch + (m * self.world_size + self.rank) * self.micro_batch

    def advance(self) -> int:
        """The next micro-batch's first global sample; moves the cursor past it."""
        first = self.first_sample()
        self.micro += 1
        return first

    @property
    def step_and_micro(self) -> tuple[int, int]:
        """(steps, micro-batch within the step) drawn since the last (re)start, for messages."""
        return divmod(self.micro, self.grad_accum)

    @property
    def consumed(self) -> int:
        """Global samples handed out by all ranks together (ranks move in lockstep)."""
        step, m = divmod(self.micro, self.grad_accum)
        return self.base + step * self.global_batch + m * self.world_size * self.micro_batch

    def restart_at(self, consumed: int) -> None:
        self.base, self.micro = int(consumed), 0


def check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise LayoutError(f"bad layout: seq_len={seq_len} (a training row needs at least 2 tokens)")
