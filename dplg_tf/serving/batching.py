"""Request batching with TF Serving's batching_parameters.txt semantics.

Concurrent requests to a batchable signature are queued as tasks; batch
threads (num_batch_threads) take tasks until max_batch_size items are
gathered or batch_timeout_micros has passed since the first task of the
batch, run them as one call and split the results. At most
max_enqueued_batches batches' worth of items wait; a request that would
overflow the queue is refused at once (the server answers
RESOURCE_EXHAUSTED). A batch that fails is rerun task by task, so one bad
request cannot fail the others.
"""

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
    __slots__ = ("items", "future")

    def __init__(self, items):
        self.items = items
        self.future = Future()


class Batcher:
    """Batches `run(items) -> per-item results` over concurrent callers.

    `items` of a task are a list; `run` receives the concatenation of the
    tasks' lists and returns a sequence of the same length.
    """

    def __init__(self, run, max_batch_size=32, batch_timeout_micros=2000,
                 num_batch_threads=2, max_enqueued_batches=64, **_):
        self._run = run
        self.max_batch_size = max_batch_size
        self.timeout = batch_timeout_micros / 1e6
        self.capacity = max_enqueued_batches * max_batch_size
        self._queue = []
        self._queued_items = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"batch-{i}", daemon=True)
                         for i in range(num_batch_threads)]
        for t in self._threads:
            t.start()

    def submit(self, items):
        """A Future of this task's results; raises QueueFull when there is no room."""
        task = _Task(list(items))
        with self._cond:
            if self._closed:
                raise BatcherClosed("this model version is being unloaded")
            if self._queued_items + len(task.items) > self.capacity and self._queue:
                raise QueueFull(
                    f"the batch queue is full ({self._queued_items} items waiting, "
                    f"capacity {self.capacity}); retry later")
            self._queue.append(task)
            self._queued_items += len(task.items)
            self._cond.notify()
        return task.future

    def __call__(self, items, timeout=None):
        return self.submit(items).result(timeout)

    def _take(self):
        """Tasks of one batch, or None when closed and empty."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._queue.pop(0)]
            size = len(batch[0].items)
            deadline = time.monotonic() + self.timeout
            while size < self.max_batch_size:
                if self._queue:
                    if size + len(self._queue[0].items) > self.max_batch_size:
                        break
                    task = self._queue.pop(0)
                    batch.append(task)
                    size += len(task.items)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            self._queued_items -= size
            return batch

    def _execute(self, tasks):
        items = [item for task in tasks for item in task.items]
        results = self._run(items)
        start = 0
        for task in tasks:
            task.future.set_result(results[start:start + len(task.items)])
            start += len(task.items)

    def _loop(self):
        while True:
            tasks = self._take()
            if tasks is None:
                return
            try:
                self._execute(tasks)
            except Exception as error:  # noqa: BLE001 - isolate the failing task
                if len(tasks) == 1:
                    tasks[0].future.set_exception(error)
                    continue
                for task in tasks:
                    try:
                        self._execute([task])
                    except Exception as e:  # noqa: BLE001
                        task.future.set_exception(e)

    def close(self):
        """Finish the queued tasks, then stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
