"""Ray processes a killed dplg-extract leaves behind, and reaping them.

A local Ray runtime shares the driver's fate only in part: when the driver
is killed (SIGKILL), its GCS server, raylet and workers end within seconds,
but the raylet's agents (ray::DashboardAgent, ray::RuntimeEnvAgent) are
reparented and keep running. So the driver records its Ray session in
OUT/ray-session.json while it runs; the next run into OUT finds the record
of a driver that is gone, stops every process still holding that session's
files open or naming it on its command line, and says so. A record whose
driver still runs means another dplg-extract is writing OUT: refused.
"""

import json
import os
import signal

from dplg_tf.errors import UserError

RECORD = "ray-session.json"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def session_processes(session_dir):
    """Pids (not ours) whose command line names `session_dir` or that hold a
    file under it open (Linux /proc; elsewhere none are found)."""
    found, me = [], os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == me:
            continue
        if session_dir in _cmdline(pid):
            found.append(pid)
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(session_dir):
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


def record(out, session_dir):
    """Note this driver's Ray session in OUT (done while it runs)."""
    from dplg_tf.storage.atomic import write_atomic

    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, RECORD), json.dumps(
        {"driver": os.getpid(), "session_dir": session_dir}))


def forget(out):
    try:
        os.remove(os.path.join(out, RECORD))
    except FileNotFoundError:
        pass


def reap(out):
    """Stop what a killed run into OUT left running; the count stopped."""
    path = os.path.join(out, RECORD)
    try:
        with open(path) as f:
            note = json.load(f)
        driver, session = int(note["driver"]), str(note["session_dir"])
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError):
        forget(out)   # a damaged record: nothing to go on
        return 0
    if driver != os.getpid() and _alive(driver) and "dplg" in _cmdline(driver):
        raise UserError(f"Another dplg-extract (pid {driver}) is writing {out}; wait for it "
                        "to finish or stop it first.")
    stopped = 0
    if os.path.isabs(session) and "session_" in os.path.basename(session):
        for pid in session_processes(session):
            try:
                os.kill(pid, signal.SIGKILL)
                stopped += 1
            except OSError:
                pass
    forget(out)
    return stopped
