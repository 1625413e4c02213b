"""The model server behind a search server (--server): whether it answers.

Searches call it with the search's deadline and no retries, so a server that
is down or slow costs a search its deadline at most, answered 503 with one
sentence. Every outcome is recorded. A check every few seconds asks the
server for its model's status while all is well (a new version is checked
with the probe image); while it is not, the check describes the probe image
over a fresh connection (a broken gRPC channel may wait minutes before it
reconnects), so searches work again as soon as the server is back with the
same model.
"""

import logging
import threading

import grpc

from dplg_tf import images
from dplg_tf.storage.descriptors import same_probe

log = logging.getLogger("dplg_tf.search")

OTHER_MODEL = ("The model server now serves another model than the index was built with; "
               "searches resume when it serves that model again.")


def sentence(error, timeout):
    """One sentence for a failed call of the model server (a ClientError)."""
    code = getattr(error, "code", None)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"The model server did not answer within {timeout:g} s; try again later."
    if code == grpc.StatusCode.UNAVAILABLE:
        return "The model server does not answer; try again later."
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "The model server is busy; try again later."
    name = code.name if code is not None else type(error).__name__
    return f"The model server failed ({name}); try again later."


class ModelServer:
    """The server of a Describer(server=...): its calls get `timeout` seconds
    and no retries; `problem` is None while it answers, else why not."""

    def __init__(self, describer, probe, timeout, check_seconds=2.0, max_message_mb=64):
        self.describer, self.probe = describer, probe
        self.timeout, self.check_seconds = float(timeout), float(check_seconds)
        self.max_message_mb = max_message_mb
        self.problem = None
        self.other_model = False
        self.version = None
        self._stop = threading.Event()
        self._thread = None
        self._use(self._connect())

    def _connect(self):
        from dplg_tf.serving.client import Client

        old = self.describer.client
        return Client(old.server, old.model_name, self.timeout, retries=0,
                      version=old.version, max_message_mb=self.max_message_mb)

    def _use(self, client):
        old, self.describer.client = self.describer.client, client
        # closed once the searches that hold it are past their deadline
        closer = threading.Timer(self.timeout + 1, old.close)
        closer.daemon = True
        closer.start()

    def failed(self, problem):
        """Record a failure (a sentence, or a ClientError); returns the sentence."""
        if not isinstance(problem, str):
            problem = sentence(problem, self.timeout)
        if self.problem is None:
            log.warning("the model server at %s: %s", self.describer.client.server, problem)
        self.problem = problem
        return problem

    def answered(self):
        if self.problem is not None and not self.other_model:
            log.info("the model server at %s answers again", self.describer.client.server)
            self.problem = None

    def _same_model(self, client):
        """Whether `client`'s server describes the probe image as the index's model did."""
        row = client.describe_bytes([images.probe_bytes()])[0]
        self.other_model = not same_probe(row, self.probe)
        if self.other_model:
            self.failed(OTHER_MODEL)
        return not self.other_model

    def check(self):
        """One check (see the module doc); errors are recorded, not raised."""
        from dplg_tf.serving.client import ClientError

        client = self.describer.client if self.problem is None else self._connect()
        try:
            versions = [v for v, state in client.status() if state == "AVAILABLE"]
            if not versions:
                self.failed("The model server has no available version of the model; "
                            "try again later.")
            elif self.problem is not None or max(versions) != self.version:
                if self._same_model(client):
                    self.version = max(versions)
                    if client is not self.describer.client:
                        self._use(client)
                    self.answered()
        except ClientError as e:
            self.failed(e)
        if client is not self.describer.client:
            client.close()

    def start(self):
        def loop():
            while not self._stop.wait(self.check_seconds):
                try:
                    self.check()
                except Exception:  # noqa: BLE001 - the checks go on
                    log.exception("checking the model server failed")

        self._thread = threading.Thread(target=loop, name="model-server-check", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)
