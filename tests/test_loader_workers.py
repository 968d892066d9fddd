"""A DataLoader's worker processes end with the block that reads them, even while the exception that ended it is
still alive (the stop signal that ends a training run): otherwise, at exit, multiprocessing waits forever for
workers that ignore SIGTERM. tests/test_training_faults.py runs the same through a whole training stopped by a
SIGTERM to the process group."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.training.batches import worker_batches
from pipeline.workers import ignore_stop_signals


class Numbers(Dataset):
    def __init__(self, broken_at: int | None = None) -> None:
        self.broken_at = broken_at

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.broken_at:
            raise ValueError(f"sample {index} is damaged")
        return torch.tensor([index])


def loader(dataset: Dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=4, num_workers=2, worker_init_fn=ignore_stop_signals)


def test_workers_end_with_a_block_that_stops_early_while_its_exception_lives_on():
    class Stop(Exception):
        pass

    with pytest.raises(Stop) as stopped:
        with worker_batches(loader(Numbers())) as batches:
            next(batches)
            assert len(multiprocessing.active_children()) == 2  # the workers run (they ignore SIGTERM)
            raise Stop("a stop signal")
    assert stopped.value.__traceback__ is not None  # the traceback is still held here ...
    assert multiprocessing.active_children() == []  # ... and the workers have ended all the same


def test_workers_end_when_a_worker_error_is_raised_from_inside_the_loader():
    """The error comes out of torch's own frames, which hold the iterator: they are cleared too."""
    with pytest.raises(ValueError, match="sample 9 is damaged") as failed:
        with worker_batches(loader(Numbers(broken_at=9))) as batches:
            for _ in batches:
                pass
    assert failed.value.__traceback__ is not None
    assert multiprocessing.active_children() == []


def test_workers_end_with_a_block_that_reads_every_batch():
    with worker_batches(loader(Numbers())) as batches:
        assert sum(len(batch) for batch in batches) == 64
    assert multiprocessing.active_children() == []
