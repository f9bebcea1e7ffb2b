"""What the framework integrations rely on from the rest of guardian: the protect()
options they build, ``SkipFirstBatches`` and ``LeaveSignalsToMain`` (public for
them), each checked on real objects — a real sampler, a real DataLoader worker
process and a real signal."""

from __future__ import annotations

import inspect
import os
import signal

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

import guardian
from guardian.integrations import ProtectOptions, protect_options
from guardian.state.data import SkipFirstBatches
from guardian.worker_signals import LeaveSignalsToMain


def test_protect_options_are_protect_keywords_with_no_epoch_saves():
    options = protect_options(
        7,
        monitor="loss",
        mode="max",
        min_delta=0.5,
        keep_last=2,
        keep_best=1,
        async_save=False,
        strict=True,
    )
    assert set(options) == set(ProtectOptions.__annotations__)
    assert set(options) <= set(inspect.signature(guardian.protect).parameters)
    assert options["every_steps"] == 7 and options["every_epochs"] is None  # the callbacks save epochs
    assert options["mode"] == "max" and options["keep_last"] == 2 and options["async_save"] is False


def test_skip_first_batches_skips_once_then_passes_through():
    inner = BatchSampler(SequentialSampler(range(10)), batch_size=3, drop_last=False)
    events: list[object] = []
    wrapped = SkipFirstBatches(inner, 2, lambda: events.append("skipped"), lambda: events.append("before"))
    first = []
    for batch in wrapped:
        events.append("batch")
        first.append(batch)
    assert first == [[6, 7, 8], [9]]
    assert events == ["before", "skipped", "batch", "batch"]  # on_skipped before the first kept batch
    assert list(wrapped) == list(inner)  # one-shot: a later iteration is the inner sampler's
    assert events.count("skipped") == 1 and events.count("before") == 1
    assert len(wrapped) == len(inner) and wrapped.batch_size == 3  # the rest is the inner sampler's


def test_skip_first_batches_reports_the_skip_even_past_the_end():
    calls = []
    wrapped = SkipFirstBatches([[0], [1]], 5, lambda: calls.append(1))
    assert list(wrapped) == []
    assert calls == [1]


class _SignalsItself(Dataset):
    """Each item sends SIGUSR1 (a preemption signal) to its own worker process first,
    then returns the worker's pid and the id its worker_init_fn recorded."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGUSR1)
        return torch.tensor([os.getpid(), _INITIALISED_AS.get("worker_id", -1)])


_INITIALISED_AS: dict[str, int] = {}


def _record_worker_id(worker_id: int) -> None:
    _INITIALISED_AS["worker_id"] = worker_id + 100


def test_leave_signals_to_main_keeps_a_signalled_worker_alive_and_calls_the_users_init():
    # SIGUSR1's default action ends a process: without the wrapper the worker dies of it.
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    loader = DataLoader(
        _SignalsItself(),
        batch_size=1,
        num_workers=1,
        worker_init_fn=LeaveSignalsToMain(_record_worker_id),
        multiprocessing_context="fork",
        timeout=120,
    )
    rows = [batch[0].tolist() for batch in loader]
    assert len(rows) == 2
    assert all(pid != os.getpid() for pid, _ in rows)  # served by the worker process
    assert [worker_id for _, worker_id in rows] == [100, 100]  # the user's worker_init_fn ran, with id 0
