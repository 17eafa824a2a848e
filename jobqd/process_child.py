"""A worker process of the process pool (`jobqd.process_pool`): ``python -m jobqd.process_child``.

A fresh interpreter (exec'd, like multiprocessing's spawn method: nothing of the
daemon's event loop is inherited). It talks to the daemon over two pipes with
length-prefixed JSON frames (4-byte big-endian length, then orjson bytes):

* stdin  <- first ``{"path": [...], "handlers": [...]}``: sys.path and the
  ``module:function`` names to import once; then one request per job:
  ``{"handler", "task", "id", "queue", "attempt", "enq", "args"}``;
* fd 1   -> ``{"ready": pid}`` (or ``{"error": ...}`` when an import failed),
  then per job any number of ``{"progress": [fraction, message]}`` frames
  (`current_job().progress`) and one reply: ``{"ok": result}`` or
  ``{"error", "tb", "kind", ...}``.

fd 1 is the protocol; `sys.stdout` is pointed at stderr first, so a handler's
``print`` goes to the daemon's log, never into the protocol. Only JSON crosses:
never a pickled callable. The child ignores SIGINT (the daemon stops it) and
dies with its daemon (``PR_SET_PDEATHSIG``), and exits when stdin closes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import struct
import sys
from typing import IO, Any

import orjson

HEADER = struct.Struct(">I")


def read_frame(f: IO[bytes]) -> Any:
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (n,) = HEADER.unpack(head)
    body = f.read(n)
    if len(body) < n:
        return None
    return orjson.loads(body)


def write_frame(f: IO[bytes], obj: Any) -> None:
    body = orjson.dumps(obj)
    f.write(HEADER.pack(len(body)) + body)
    f.flush()


def _die_with_parent() -> None:
    """Linux: SIGKILL this child when the daemon dies (even by kill -9)."""
    with contextlib.suppress(Exception):
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the daemon died before prctl took effect
        os._exit(0)


def _import(spec: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class _Progress:
    """`current_job().progress(...)` in a child: a frame to the daemon, which keeps the
    latest and writes it coalesced, as for its own jobs."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out

    def progress(self, job_id: str, queue: str, fraction: float, message: str | None) -> None:
        write_frame(self.out, {"progress": [fraction, message]})


def _run(fns: dict[str, Any], req: dict[str, Any], out: IO[bytes]) -> dict[str, Any]:
    from jobqd.errors import Fail, Retry  # noqa: PLC0415
    from jobqd.execute import bad_args  # noqa: PLC0415
    from jobqd.jobs import CurrentJob, _current  # noqa: PLC0415
    from jobqd.outcomes import error_text, traceback_text  # noqa: PLC0415

    spec = req["handler"]
    try:
        fn = fns.get(spec) or fns.setdefault(spec, _import(spec))  # a task added by a reload
    except Exception as e:
        return {"error": f"cannot import {spec}: {error_text(e)}", "tb": traceback_text(e)}
    token = _current.set(CurrentJob(id=req["id"], task=req["task"], queue=req["queue"],
                                    attempt=req["attempt"], enqueued_at=req["enq"] / 1000,
                                    _progress=_Progress(out)))
    try:
        result = fn(**req["args"])
    except Retry as e:
        # as text: JSON has no inf or nan, and the daemon validates the delay itself
        return {"retry": None if e.delay_s is None else str(e.delay_s),
                "reason": str(e.reason)}
    except Fail as e:
        return {"fail": str(e.reason)}
    except Exception as e:
        why = bad_args(fn, req["args"]) if isinstance(e, TypeError) else None
        return {"error": error_text(e), "tb": traceback_text(e), "bad_args": why}
    finally:
        _current.reset(token)
    try:
        orjson.dumps(result)
    except TypeError as e:
        return {"bad_result": f"result is not JSON-serialisable: {e}"}
    return {"ok": result}


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # print() in a handler goes to stderr, never into the protocol
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    init = read_frame(proto_in)
    if init is None:
        return
    for p in reversed(init["path"]):
        if p not in sys.path:
            sys.path.insert(0, p)
    fns: dict[str, Any] = {}
    try:
        for spec in init["handlers"]:
            fns[spec] = _import(spec)
    except Exception as e:
        write_frame(proto_out, {"error": f"cannot import {spec}: {type(e).__name__}: {e}"})
        return
    write_frame(proto_out, {"ready": os.getpid()})
    while (req := read_frame(proto_in)) is not None:
        write_frame(proto_out, _run(fns, req, proto_out))


if __name__ == "__main__":
    main()
