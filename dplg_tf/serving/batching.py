"""Request batching with TF Serving's batching_parameters.txt semantics.

Concurrent requests to a batchable signature are queued as tasks; batch
threads (num_batch_threads) take tasks until max_batch_size items are
gathered or batch_timeout_micros has passed since the first task of the
batch, run them as one call and split the results. At most
max_enqueued_batches batches' worth of items wait; a request that would
overflow the queue is refused at once (the server answers
RESOURCE_EXHAUSTED). A batch that fails is rerun task by task, so one bad
request cannot fail the others.

A request larger than max_batch_size is cut into tasks of at most that
size. Tasks are served by round, counted from the round being served when
the request arrived: a new request's first task shares the current round
with the next task of every older request (the older first), so under
sustained small traffic a large request still gets one task per round and
finishes, and a large request cannot hold every batch thread while small
ones wait. A task whose deadline has passed or whose caller has gone is
dropped when it is taken, never run; a caller never waits past its deadline.
A batch thread that dies answers its callers with the error and is replaced.
"""

import heapq
import itertools
import re
import threading
import time
from concurrent.futures import Future

DEFAULTS = {"max_batch_size": 32, "batch_timeout_micros": 2000, "num_batch_threads": 2,
            "max_enqueued_batches": 64}


class QueueFull(Exception):
    """The batch queue has no room for the request."""


class BatcherClosed(QueueFull):
    """The batcher was closed (its model version is being unloaded)."""


class Expired(Exception):
    """The request's deadline passed before it was run."""


class Cancelled(Exception):
    """The caller went away before the request was run."""


def parse_batching_parameters(text):
    """The integer fields of a batching_parameters.txt (text-format
    BatchingParameters: `max_batch_size { value: 32 }` ...), over DEFAULTS."""
    params = dict(DEFAULTS)
    text = re.sub(r"#[^\n]*", "", text)
    for name, value in re.findall(r"(\w+)\s*\{\s*value\s*:\s*(-?\d+)\s*\}", text):
        params[name] = int(value)
    for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
        if params[name] < 1:
            raise ValueError(f"batching parameter {name} must be >= 1, got {params[name]}.")
    if params["batch_timeout_micros"] < 0:
        raise ValueError("batching parameter batch_timeout_micros must be >= 0.")
    return params


class _Task:
    __slots__ = ("items", "future", "deadline", "is_active", "enqueued")

    def __init__(self, items, deadline=None, is_active=None):
        self.items = items
        self.enqueued = time.monotonic()
        self.future = Future()
        self.deadline = deadline
        self.is_active = is_active

    def dropped(self):
        """Expired or Cancelled when the task must not run, else None."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return Expired("the request's deadline passed while it waited in the queue")
        if self.is_active is not None and not self.is_active():
            return Cancelled("the client went away while the request waited in the queue")
        return None


class Batcher:
    """Batches `run(items) -> per-item results` over concurrent callers.

    `run` receives the concatenation of the tasks' item lists and returns a
    sequence of the same length. `observe(batch_size, [seconds each task
    waited])`, if given, is told of every batch run (the server's metrics).
    """

    def __init__(self, run, max_batch_size=32, batch_timeout_micros=2000,
                 num_batch_threads=2, max_enqueued_batches=64, observe=None, **_):
        self._run = run
        self._observe = observe
        self.max_batch_size = max_batch_size
        self.timeout = batch_timeout_micros / 1e6
        self.capacity = max_enqueued_batches * max_batch_size
        self._heap = []            # (round, sequence, task)
        self._seq = itertools.count()
        self._round = 0            # the round of the task taken last
        self._queued_items = 0
        self.items_run = 0         # items handed to `run` (a count for tests and logs)
        self.replaced = 0          # batch threads that died and were replaced
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"batch-{i}", daemon=True)
                         for i in range(num_batch_threads)]
        for t in self._threads:
            t.start()

    def submit(self, items, deadline=None, is_active=None):
        """Futures of this request's tasks (one per max_batch_size items);
        raises QueueFull when there is no room. `deadline` is a
        time.monotonic() value; `is_active()` says whether the caller waits."""
        items = list(items)
        tasks = [_Task(items[i:i + self.max_batch_size], deadline, is_active)
                 for i in range(0, len(items), self.max_batch_size)]
        with self._cond:
            if self._closed:
                raise BatcherClosed("this model version is being unloaded")
            if self._queued_items + len(items) > self.capacity and self._heap:
                raise QueueFull(
                    f"the batch queue is full ({self._queued_items} items waiting, "
                    f"capacity {self.capacity}); retry later")
            for k, task in enumerate(tasks):
                heapq.heappush(self._heap, (self._round + 1 + k, next(self._seq), task))
            self._queued_items += len(items)
            self._cond.notify(len(tasks))
        return [task.future for task in tasks]

    def __call__(self, items, timeout=None, deadline=None, is_active=None):
        """The results of `items`; waits at most until `deadline` (then Expired)."""
        import concurrent.futures

        results = []
        for future in self.submit(items, deadline, is_active):
            wait = timeout
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                wait = left if wait is None else min(wait, left)
            try:
                results.extend(future.result(wait))
            except concurrent.futures.TimeoutError:
                raise Expired("the request's deadline passed while it ran") from None
        return results

    def _remove_top(self):
        round_, _, task = heapq.heappop(self._heap)
        self._queued_items -= len(task.items)
        self._round = max(self._round, round_)
        return task

    def _next(self, room):
        """The next task that may still run if it fits in `room` items; dropped
        tasks on the way are answered. None when the queue has none that fits."""
        while self._heap:
            top = self._heap[0][2]
            reason = top.dropped()
            if reason is not None:
                self._remove_top().future.set_exception(reason)
                continue
            return self._remove_top() if len(top.items) <= room else None
        return None

    def _take(self):
        """Tasks of one batch, or None when closed and empty."""
        with self._cond:
            first = self._next(self.max_batch_size)
            while first is None:
                if self._closed and not self._heap:
                    return None
                self._cond.wait()
                first = self._next(self.max_batch_size)
            batch, size = [first], len(first.items)
            deadline = time.monotonic() + self.timeout
            while size < self.max_batch_size:
                if self._heap:
                    task = self._next(self.max_batch_size - size)
                    if task is None:
                        if self._heap:  # the next one does not fit
                            break
                        continue
                    batch.append(task)
                    size += len(task.items)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            return batch

    def _execute(self, tasks):
        items = [item for task in tasks for item in task.items]
        self.items_run += len(items)
        if self._observe is not None:
            now = time.monotonic()
            self._observe(len(items), [now - task.enqueued for task in tasks])
        results = self._run(items)
        start = 0
        for task in tasks:
            task.future.set_result(results[start:start + len(task.items)])
            start += len(task.items)

    def _loop(self):
        tasks = []
        try:
            while True:
                tasks = self._take()
                if tasks is None:
                    return
                self._run_isolated(tasks)
        except BaseException as error:  # the thread dies: answer its callers, replace it
            for task in tasks or []:
                if not task.future.done():
                    task.future.set_exception(RuntimeError(
                        f"the batch thread stopped ({type(error).__name__}: {error})"))
            self._replace(threading.current_thread())
            raise

    def _run_isolated(self, tasks):
        try:
            self._execute(tasks)
        except Exception as error:  # noqa: BLE001 - isolate the failing task
            if len(tasks) == 1:
                tasks[0].future.set_exception(error)
                return
            for task in tasks:
                try:
                    self._execute([task])
                except Exception as e:  # noqa: BLE001
                    task.future.set_exception(e)

    def _replace(self, dead):
        with self._cond:
            if self._closed:
                return
            thread = threading.Thread(target=self._loop, name=dead.name, daemon=True)
            self._threads = [t for t in self._threads if t is not dead] + [thread]
            self.replaced += 1
        thread.start()

    @property
    def queued_items(self):
        """Items waiting in the queue."""
        return self._queued_items

    def close(self):
        """Finish the queued tasks, then stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in list(self._threads):
            t.join()
