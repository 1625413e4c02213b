"""The search server's index reload: bad states are refused and reported while
the last good one is served, the reload thread outlives anything, and every
answer tells the state it was computed on and what was done."""

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from dplg_tf.search.index import DescriptorIndex
from dplg_tf.search.searcher import Searcher
from dplg_tf.search.service import SearchServer
from dplg_tf.storage.atomic import StateFolder, write_atomic

DIM = 8
PROBE = np.eye(DIM, dtype=np.float32)[0]


class FakeDescriber:
    """What a Searcher needs of a model for searches by descriptor."""

    identity = "/models/fake/1"
    client = None

    def probe(self):
        return PROBE


def _index(n, prefix, seed=0):
    rows = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    index = DescriptorIndex(DIM, "exact", PROBE)
    index.add(rows, [f"{prefix}{i}.jpg" for i in range(n)])
    return index, rows


def _state_files(tmp_path, n, prefix, seed=0):
    """{file name: bytes} of a good committed state of n vectors."""
    scratch = str(tmp_path / f"scratch-{prefix}{n}-{seed}")
    _index(n, prefix, seed)[0].save(scratch)
    state = StateFolder(scratch).current()
    return {name: open(os.path.join(state, name), "rb").read() for name in os.listdir(state)}


def _commit(folder, files):
    states = StateFolder(folder)
    tmp = states.new()
    for name, data in files.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    return os.path.basename(states.commit(tmp))


def _until(cond, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _http(srv, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{srv.address}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode()


def _refused_metric(srv):
    from prometheus_client.parser import text_string_to_metric_families

    text = _http(srv, "/metrics")[1]
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "dplg_search_index_refused_total":
                return sample.value
    return None


@pytest.fixture
def served(tmp_path):
    """A search server over idx/ (a state of 5 vectors a0..a4), reloading every 20 ms."""
    folder = str(tmp_path / "idx")
    first = _commit(folder, _state_files(tmp_path, 5, "a"))
    searcher = Searcher(folder, FakeDescriber(), reload_seconds=0.02)
    srv = SearchServer(searcher, "127.0.0.1", 0, workers=2, max_concurrent=8).start()
    yield srv, folder, first
    srv.stop(5)


def _with_sha(files):
    """`files` with meta.json's checksums made to match (a buggy writer's state)."""
    meta = json.loads(files["meta.json"])
    meta["sha256"] = {n: hashlib.sha256(files[n]).hexdigest() for n in meta["sha256"]}
    return dict(files, **{"meta.json": json.dumps(meta).encode()})


def _bad_states(good):
    meta = json.loads(good["meta.json"])
    return {
        "meta.json is a list": (dict(good, **{"meta.json": b"[1, 2]"}), "meta.json"),
        "names.json is a dict": (_with_sha(dict(good, **{"names.json": json.dumps(
            {str(i): f"z{i}.jpg" for i in range(6)}).encode()})), "names.json"),
        "dim is a string": (dict(good, **{"meta.json": json.dumps(
            dict(meta, dim=str(meta["dim"]))).encode()}), "'dim'"),
        "meta.json is not JSON": (dict(good, **{"meta.json": b"{\"dim\": "}), "damaged"),
    }


BAD = ["meta.json is a list", "names.json is a dict", "dim is a string",
       "meta.json is not JSON", "CURRENT names no state"]


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_state_is_refused_and_reported_and_a_later_good_one_served(served, tmp_path,
                                                                         bad):
    srv, folder, first = served
    query = {"descriptor": _index(5, "a")[1][3].tolist(), "top_k": 2}
    if bad == "CURRENT names no state":
        write_atomic(os.path.join(folder, StateFolder.POINTER), "state-000099\n")
        words = "names no state"
    else:
        files, words = _bad_states(_state_files(tmp_path, 6, "z", seed=1))[bad]
        _commit(folder, files)
    assert _until(lambda: _http(srv, "/v1/health")[1]["status"] == "degraded")
    health = _http(srv, "/v1/health")[1]
    assert words in health["reason"] and "refused" in health["reason"], health
    assert first in health["reason"] and str(tmp_path) not in health["reason"]
    assert health["index"] == {"folder": "idx", "state": first, "kind": "exact", "vectors": 5}
    assert _refused_metric(srv) == 1
    for _ in range(3):   # the last good state answers, again and again
        status, answer = _http(srv, "/v1/search", query)
        assert status == 200, answer
        assert answer["results"][0]["name"] == "a3.jpg" and answer["index"]["state"] == first
    # a later good state is served, and the server is healthy again
    second = _commit(folder, _state_files(tmp_path, 7, "b", seed=2))
    assert _until(lambda: _http(srv, "/v1/search", query)[1]["index"]["state"] == second)
    answer = _http(srv, "/v1/search", query)[1]
    assert answer["index"]["vectors"] == 7 and answer["results"][0]["name"].startswith("b")
    health = _http(srv, "/v1/health")[1]
    assert health["status"] == "ok" and "reason" not in health, health
    assert _refused_metric(srv) == 1   # counted once, however often it was seen


class Kill(BaseException):
    """What no `except Exception` catches."""


def test_the_reload_thread_is_restarted_when_killed_else_health_says_so(served, tmp_path,
                                                                       monkeypatch):
    srv, folder, first = served
    searcher = srv.searcher
    killed = threading.Event()

    def die():
        killed.set()
        raise Kill("killed on purpose")

    monkeypatch.setattr(searcher, "reload_if_changed", die)
    old = searcher._thread
    assert killed.wait(30)
    assert _until(lambda: not old.is_alive())
    monkeypatch.undo()   # the new thread calls the real method again
    second = _commit(folder, _state_files(tmp_path, 7, "b", seed=2))
    assert _until(lambda: _http(srv, "/v1/health")[1]["index"]["state"] == second)
    assert searcher._thread is not old and searcher._thread.is_alive()
    assert _http(srv, "/v1/health")[1]["status"] == "ok"

    # a thread that cannot be started again: /v1/health says so
    killed.clear()
    monkeypatch.setattr(searcher, "reload_if_changed", die)

    def cannot_start():
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(searcher, "_start_reloads", cannot_start)
    assert killed.wait(30)
    assert _until(lambda: _http(srv, "/v1/health")[1]["status"] == "degraded")
    assert "reload thread has stopped" in _http(srv, "/v1/health")[1]["reason"]


def _two_states(tmp_path):
    """idx/ holding state-000001 (5 vectors a*) and state-000002 (9 vectors b*),
    CURRENT naming the first."""
    folder = tmp_path / "idx"
    folder.mkdir()
    for number, (n, prefix) in enumerate([(5, "a"), (9, "b")], 1):
        state = folder / f"state-{number:06d}"
        state.mkdir()
        for name, data in _state_files(tmp_path, n, prefix, seed=number).items():
            (state / name).write_bytes(data)
    write_atomic(str(folder / "CURRENT"), "state-000001\n")
    return str(folder)


def test_an_answer_reports_the_state_it_was_computed_on_while_current_flips(tmp_path):
    folder = _two_states(tmp_path)
    searcher = Searcher(folder, FakeDescriber(), reload_seconds=0)
    index = searcher.index
    search = index.search

    def search_and_flip(*args, **kwargs):   # the other state is swapped in meanwhile
        out = search(*args, **kwargs)
        write_atomic(os.path.join(folder, "CURRENT"), "state-000002\n")
        assert searcher.reload_if_changed()
        return out

    index.search = search_and_flip
    answer = searcher.search({"descriptor": np.ones(DIM, np.float32), "top_k": 20,
                              "qe_k": 0, "qe_alpha": 3.0, "attention": False})
    assert answer["index"]["state"] == "state-000001"
    assert answer["index"]["vectors"] == 5 == len(answer["results"])
    assert all(r["name"].startswith("a") for r in answer["results"])
    after = searcher.search({"descriptor": np.ones(DIM, np.float32), "top_k": 20,
                             "qe_k": 0, "qe_alpha": 3.0, "attention": False})
    assert after["index"] == {"folder": "idx", "state": "state-000002", "kind": "exact",
                              "vectors": 9}
    assert len(after["results"]) == 9


def test_answers_agree_with_themselves_while_current_flips_under_load(tmp_path):
    folder = _two_states(tmp_path)
    searcher = Searcher(folder, FakeDescriber(), reload_seconds=0.001).start()
    stop = threading.Event()

    def flip():
        n = 0
        while not stop.is_set():
            n += 1
            write_atomic(os.path.join(folder, "CURRENT"), f"state-00000{1 + n % 2}\n")
            time.sleep(0.002)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    seen, wrong = set(), []
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            answer = searcher.search({"descriptor": np.ones(DIM, np.float32), "top_k": 20,
                                      "qe_k": 0, "qe_alpha": 3.0, "attention": False})
            state, names = answer["index"]["state"], [r["name"] for r in answer["results"]]
            seen.add(state)
            want = ("a", 5) if state == "state-000001" else ("b", 9)
            if (answer["index"]["vectors"], len(names)) != (want[1], want[1]) or any(
                    not n.startswith(want[0]) for n in names):
                wrong.append(answer["index"])
    finally:
        stop.set()
        flipper.join(10)
        searcher.stop()
    assert seen == {"state-000001", "state-000002"}
    assert not wrong, f"{len(wrong)} answers mixed two states, e.g. {wrong[0]}"


@pytest.mark.parametrize("default", [False, True])
def test_the_answer_says_what_was_done(tmp_path, default):
    folder = str(tmp_path / "idx")
    _commit(folder, _state_files(tmp_path, 5, "a"))
    from dplg_tf.retrieval.query import Settings

    settings = Settings(qe_k=1, qe_alpha=2.0, rerank=default,
                        rerank_params={"m": 4, "k": 2, "beta": 0.15})
    searcher = Searcher(folder, FakeDescriber(), reload_seconds=0, settings=settings)
    base = {"descriptor": np.ones(DIM, np.float32), "top_k": 3, "attention": False}
    cases = [({}, default, 1, 2.0), ({"rerank": True}, True, 1, 2.0),
             ({"rerank": False, "qe_k": 0}, False, 0, None),
             ({"rerank": True, "qe_k": 2, "qe_alpha": 3.0}, True, 2, 3.0),
             ({"qe_k": 50}, default, 5, 2.0)]   # clamped to the index's 5
    fixed = {"reranker": "superglobal", "m": 4, "k": 2, "beta": 0.15, "dba_k": 0,
             "dba_alpha": None, "dba_graph": None}
    for extra, rerank, qe_k, qe_alpha in cases:
        answer = searcher.search(dict(base, **extra))
        assert answer["search"] == dict(fixed, rerank=rerank, qe_k=qe_k,
                                        qe_alpha=qe_alpha), extra
    assert searcher.info()["search"] == dict(fixed, rerank=default, qe_k=1, qe_alpha=2.0)


def test_a_hung_read_of_the_index_folder_is_reported_and_clears(tmp_path, monkeypatch):
    """A check of the folder that does not return (a stuck network disk) is
    told by problem() once it passes STUCK_SECONDS, and forgotten when it ends."""
    folder = str(tmp_path / "idx")
    _commit(folder, _state_files(tmp_path, 5, "a"))
    searcher = Searcher(folder, FakeDescriber(), reload_seconds=0.05)
    monkeypatch.setattr(searcher, "STUCK_SECONDS", 0.3)
    release, entered = threading.Event(), threading.Event()
    load = searcher._load

    def hung_load():
        entered.set()
        release.wait(30)
        return load()

    monkeypatch.setattr(searcher, "_load", hung_load)
    searcher.start()
    try:
        assert searcher.problem() is None
        _commit(folder, _state_files(tmp_path, 6, "b"))
        assert entered.wait(10)
        assert _until(lambda: searcher.problem() is not None, 10)
        assert "Reading the index folder has not finished" in searcher.problem()
        assert searcher.search({"descriptor": np.ones(DIM, np.float32), "top_k": 2,
                                "attention": False})["index"]["vectors"] == 5  # still served
        release.set()
        assert _until(lambda: searcher.index is not None and len(searcher.index) == 6, 10)
        assert _until(lambda: searcher.problem() is None, 10)
    finally:
        release.set()
        searcher.stop()
