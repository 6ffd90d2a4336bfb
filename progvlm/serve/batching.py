"""A cloud that batches: concurrent requests share one pass of the language model.

`CloudModel` (progvlm.serve.model) runs one request at a time under a lock, so throughput stays
flat as clients are added and most of a worker's time is spent waiting for the lock.
`BatchingCloudModel` has the same interface (full, progressive, info, warm_up) and answers
the same text, but:

* what is cheap or differs per request runs in the request's own thread, under no lock:
  parsing the bitstream (progressive, CloudModel.progressive: once per stream), decoding the
  image and the vision half (full);
* the rest runs one batch at a time: whenever the model is free, every request queued (at
  most `max_batch`) runs as one batch (`run_jobs`: the MAE decoder over all their frames at
  once, `Split.decode_batch`, then padded prefill and greedy decoding,
  `Split.language_batch`; the same answers as one by one), in the thread of one of the
  waiting requests (`MicroBatcher`).

How long a batch waits to fill: when the previous batch held one request (a lone client), not
at all, so one client's latency is what it was. When the previous batch held n > 1
(concurrent clients), at most `max_wait_ms` for the batch to grow back to n, then it runs
what it has. Under load the queue fills while a batch computes anyway, so the wait only
rounds off the stragglers.

Every answer's stage_ms stays truthful: the request's own stages (image_decode_ms and
vision_ms for full), `queue_ms` (from queueing the request to its batch starting: the lock
wait of CloudModel, renamed), then the batch's stages (mae_decode_ms, prefill_ms,
generation_ms, or language_ms), which are the whole batch's, shared by `batch_size` requests
(a top-level field of every answer).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..backends.base import Answer, Grid
from ..net.protocol import to_ms
from ..split import Frame, Split
from .model import CloudModel, refused_as_400, said

#: the most requests one batch holds (16 answers take ~4-5 × one answer's time on one CPU
#: thread with the bundled VLM; larger batches add latency for little more throughput)
MAX_BATCH = 16
#: the longest a batch waits for more requests, and only while clients are concurrent
MAX_WAIT_MS = 5.0


@dataclass
class Batched:
    """One request's result and how it was run."""
    result: Any
    queue_ms: float  # submitted → its batch started
    batch_size: int  # requests in the batch that computed it


@dataclass
class _Pending:
    item: Any
    submitted: float
    done: bool = False
    outcome: Batched | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Runs items submitted from many threads in batches: `run_batch(items) -> results`
    (same order). `submit(item)` blocks until the item's batch is done and returns a
    `Batched` (or raises what its run raised). At most one batch runs at a time.

    There is no worker thread: a submitter that finds nothing running runs the next batch
    itself (leader/follower), so a lone request pays no thread hand-off, which on a busy host
    costs milliseconds. The others wait; when a batch ends, one of them leads the next.

    One bad item does not fail its batch-mates: when a batch of several raises, each of its
    items is run again alone, and only the failing ones raise."""

    def __init__(self, run_batch: Callable[[list], list], max_batch: int = MAX_BATCH,
                 max_wait_ms: float = MAX_WAIT_MS):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not 0 <= max_wait_ms <= 1000:
            raise ValueError(f"max_wait_ms must be in 0..1000, got {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a leader filling its batch waits here
        self._finished = threading.Condition(self._lock)  # the others wait here
        self._queue: deque[_Pending] = deque()
        self._running = False
        self._expected = 1  # the previous batch's size: how many clients are concurrent

    def submit(self, item) -> Batched:
        mine = _Pending(item, time.perf_counter())
        with self._lock:
            self._queue.append(mine)
            self._arrived.notify()
        while True:
            with self._lock:
                while not mine.done and self._running:
                    self._finished.wait()
                if mine.done:
                    break
                self._running = True  # nothing runs and mine waits: lead the next batch
                batch = self._collect()
            try:
                self._run(batch)
            finally:
                with self._lock:
                    for p in batch:  # only if run_batch raised past Exception (an interrupt)
                        if not p.done:
                            p.error, p.done = RuntimeError("the batch was interrupted"), True
                    self._running = False
                    self._finished.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.outcome

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        with self._lock:
            return len(self._queue)

    @contextmanager
    def paused(self):
        """No batch starts inside this block (one already running finishes); on leaving it,
        what queued meanwhile runs. For draining and for tests that need a known batch."""
        with self._lock:
            while self._running:
                self._finished.wait()
            self._running = True
        try:
            yield self
        finally:
            with self._lock:
                self._running = False
                self._finished.notify_all()

    def _collect(self) -> list[_Pending]:
        """(Lock held.) The queue's head, up to max_batch; while clients are concurrent,
        first wait at most max_wait_ms for the queue to reach the previous batch's size."""
        target = min(self.max_batch, self._expected)
        deadline = time.perf_counter() + self.max_wait_ms / 1e3
        while len(self._queue) < target:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._arrived.wait(left)
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
        self._expected = len(batch)
        return batch

    def _run(self, batch: list[_Pending]):
        outcomes = run_isolated(self.run_batch, [p.item for p in batch], [p.submitted for p in batch])
        for p, outcome in zip(batch, outcomes):
            if isinstance(outcome, Batched):
                p.outcome = outcome
            else:
                p.error = outcome
            p.done = True


def run_isolated(run_batch: Callable[[list], list], items: list,
                 submitted: list[float]) -> list[Batched | Exception]:
    """run_batch(items) as one batch, each result a Batched (submitted[i]: when item i was
    queued, perf_counter). If the batch raises, each item runs alone, so that only the
    failing ones get their exception (returned, not raised)."""
    started = time.perf_counter()
    try:
        results = run_batch(items)
    except Exception as e:
        if len(items) == 1:
            return [e]
        return [run_isolated(run_batch, [item], [t])[0] for item, t in zip(items, submitted)]
    return [Batched(r, to_ms(started - t), len(items)) for r, t in zip(results, submitted)]


@dataclass
class Job:
    """One request's cloud work as a batch takes it: a frame to MAE-decode (progressive) or
    visual tokens the request made itself (full), and the question."""
    question: str
    frame: Frame | None = None
    tokens: torch.Tensor | None = None
    grid: Grid = None


def run_jobs(split: Split, jobs: list[Job], max_new_tokens: int = 32) -> list[Answer]:
    """The cloud half of a batch: the frames' MAE decode in one pass, then one language batch.
    Each answer's stage_ms: mae_decode_ms (the batch's decoding, where it decoded any frame),
    then the language stages (the batch's). Raises as Split.decode_batch/language_batch do,
    for the whole batch (MicroBatcher then runs its jobs alone)."""
    frames = [job.frame for job in jobs if job.frame is not None]
    t0 = time.perf_counter()
    decoded = iter(split.decode_batch(frames))
    decode_ms = to_ms(time.perf_counter() - t0)
    requests = [(next(decoded), job.question, job.frame.grid) if job.frame is not None
                else (job.tokens, job.question, job.grid) for job in jobs]
    answers = split.language_batch(requests, max_new_tokens)
    framed = [i for i, job in enumerate(jobs) if job.frame is not None]
    split.probe([jobs[i].frame for i in framed], [jobs[i].question for i in framed],
                [answers[i] for i in framed], max_new_tokens)
    if frames:
        for answer in answers:
            answer.stage_ms = {"mae_decode_ms": decode_ms, **answer.stage_ms}
    return answers


class BatchingCloudModel(CloudModel):
    """CloudModel's interface and answers; the cloud half of concurrent requests runs in
    batches (see the module docstring). Subclasses may route `_submit` elsewhere (the Ray
    Serve deployment hands jobs to @serve.batch)."""

    def __init__(self, split: Split, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS,
                 submit: Callable[[Job], Batched] | None = None, how: str | None = None):
        """`submit` (job → Batched, raising what the job raised): where jobs are batched; by
        default a MicroBatcher in this process (the Ray Serve replica passes its @serve.batch
        method). `how`: the batching policy as /v1/info states it."""
        super().__init__(split)
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms
        self.batcher = None
        if submit is None:
            self.batcher = MicroBatcher(lambda jobs: run_jobs(split, jobs), max_batch, max_wait_ms)
            submit = self.batcher.submit
            how = how or (f"up to {max_batch} concurrent requests run as one batch, waiting at "
                          f"most {max_wait_ms:g} ms for it to fill, and only while clients are "
                          "concurrent")
        self._submit = submit
        self._how = how or f"up to {max_batch} concurrent requests run as one batch"

    def info(self) -> dict:
        how = "batched: " + self._how
        if not self.split.vlm.batches_language:
            how += "; this VLM's backend has no batch path, so its language half runs one by one"
        return {**self.split.info(), "concurrency": how,
                "batching": {"max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms,
                             "backend_batches": self.split.vlm.batches_language}}

    def _run(self, stages: dict, job: Job) -> dict:
        """The job through the batcher → {"answer", "confidence", "batch_size"}; its queue
        time and the batch's stage times go into `stages`."""
        with refused_as_400():
            done = self._submit(job)
        stages["queue_ms"] = done.queue_ms
        return {**said(done.result, stages), "batch_size": done.batch_size}

    def full(self, image_bytes: bytes, question: str) -> dict:
        tokens, grid, stages = self._see(image_bytes)  # per request, in its own thread
        return {**self._run(stages, Job(question, tokens=tokens, grid=grid)), "stage_ms": stages}

    def _cloud_half(self, stages: dict, frame: Frame, question: str) -> dict:
        return self._run(stages, Job(question, frame=frame))

