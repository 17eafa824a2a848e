"""The `jobqd` command line.

Config: ``-c FILE`` (before or after the subcommand), else ``$JOBQD_CONFIG``,
else ``/etc/jobqd.yaml``. Every command exits with a named code
(`jobqd.exitcodes.ExitCode`), so scripts and systemd can tell a config error
(78) from an unreachable Redis (69).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import orjson
import yaml
from redis.exceptions import OutOfMemoryError, RedisError

from jobqd import __version__, config, connect, logs, ops
from jobqd.client import SyncClient
from jobqd.errors import (
    ConfigError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    NotReplicated,
    PayloadTooLarge,
    QueueFull,
    RedisOutOfMemory,
    UnknownTask,
)
from jobqd.exitcodes import ExitCode
from jobqd.jobs import BadJob, validate_delay_s

log = logging.getLogger("jobqd.cli")

# What `jobqd init` writes (path under DIR, the same path under jobqd/share/ in the
# package) and where the canonical copy lives in the repository (a test keeps them equal).
SHARE_FILES: tuple[tuple[str, str], ...] = (
    ("jobqd.yaml", "etc/jobqd.yaml"),
    ("systemd/jobqd.service", "systemd/jobqd.service"),
    ("systemd/jobqd@.service", "systemd/jobqd@.service"),
    ("systemd/jobqd.sysusers.conf", "systemd/jobqd.sysusers.conf"),
    ("prometheus/jobqd-alerts.yml", "etc/prometheus/jobqd-alerts.yml"),
    ("grafana/jobqd-dashboard.json", "etc/grafana/jobqd-dashboard.json"),
)
NO_CONFIG_COMMANDS = frozenset({"init", "completion"})
_TIME_KEYS = frozenset({"enqueued_at", "scheduled_for", "started_at", "finished_at",
                        "died_at"})
_PAGE = 500  # dead-letter entries fetched per round trip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


class _Usage(Exception):
    """A command-line mistake found after parsing: usage line, message, exit 64."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


def _out(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def _line(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")


def _err(msg: str) -> None:
    sys.stderr.write(f"jobqd: {msg}\n")


def iso(ts: float | None) -> str:
    """Seconds since the epoch as ISO 8601 UTC (``2026-12-01T10:14:14.123Z``); None: ``-``."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _text_value(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key in _TIME_KEYS and isinstance(v, int | float):
        return iso(v)
    if isinstance(v, str):
        return v
    return orjson.dumps(v).decode()


def _record(d: dict[str, Any]) -> None:
    """A job or dead-letter record for people: one ``key: value`` a line, ISO times, the
    traceback as its own lines."""
    d = dict(d)
    tb = d.pop("traceback", None)
    width = max(len(k) for k in d) + 1
    for k, v in d.items():
        sys.stdout.write(f"{k + ':':<{width}} {_text_value(k, v)}\n")
    if tb:
        sys.stdout.write("traceback:\n")
        for tb_line in str(tb).rstrip("\n").splitlines():
            sys.stdout.write(f"  {tb_line}\n")


def _load(args: argparse.Namespace) -> config.Config:
    return config.load(args.config, import_handlers=False)


def _client(cfg: config.Config) -> SyncClient:
    return SyncClient(cfg.redis_url, cfg.redis.prefix, idempotency_ttl_s=cfg.idempotency_ttl_s,
                      results_ttl_s=cfg.results.ttl_s, wait_replicas=cfg.redis.wait_replicas,
                      wait_timeout_s=cfg.redis.wait_timeout_s)


def _op(c: SyncClient, op: ops.Op[ops.T]) -> ops.T:
    return ops.SyncRunner(c.redis).run(op)


# ---------------------------------------------------------------- argument types


def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v!r}")
    return n


def _positive_float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {v!r}") from None
    if not (x > 0 and x < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {v!r}")
    return x


def _delay_s(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"delay_s must be a number, got {v!r}") from None
    try:
        return validate_delay_s(x)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    logs.setup(cfg.log.level, cfg.log.format)
    from jobqd.daemon import run_daemon  # noqa: PLC0415 - keeps CLI start-up light

    log.info("jobqd %s starting with %s", __version__, cfg.path)
    return int(run_daemon(cfg))


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    sys.stdout.write(f"# {cfg.path}: OK ({len(cfg.tasks)} tasks, {len(cfg.queues)} queues; "
                     "every handler imported)\n")
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(mask_secrets=True), sort_keys=False))
    return ExitCode.OK


def _read_args_json(args: argparse.Namespace) -> str | None:
    spec: str | None = args.args_json
    if spec == "-":
        return sys.stdin.read()
    if spec is not None and spec.startswith("@"):
        try:
            return Path(spec[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise _Usage(args.parser, f"cannot read ARGS_JSON from {spec[1:]!r}: {e}") from None
    return spec


def cmd_enqueue(args: argparse.Namespace) -> int:
    text = _read_args_json(args)
    try:
        job_args = orjson.loads(text) if text and text.strip() else None
    except orjson.JSONDecodeError as e:
        _err(f"ARGS_JSON is not valid JSON: {e}")
        return ExitCode.USAGE
    if job_args is not None and not isinstance(job_args, dict):
        _err("ARGS_JSON must be a JSON object of keyword arguments, e.g. '{\"to\": \"a@b.c\"}'")
        return ExitCode.USAGE
    with _client(_load(args)) as c:
        job = c.enqueue(args.task, job_args, queue=args.queue, delay_s=args.delay_s,
                        idempotency_key=args.idempotency_key, wait=args.wait,
                        timeout_s=args.timeout_s, expires_s=args.expires_s)
    sys.stdout.write(job.id + "\n")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    with _client(cfg) as c:
        try:
            info = c.status(args.job_id)
        except JobNotFound:
            if not cfg.postgres.ledger:
                raise
            from jobqd import ledger  # noqa: PLC0415 - only with PostgreSQL

            found = asyncio.run(ledger.lookup(cfg, args.job_id))  # Redis record expired
            if found is None:
                raise
            info = found
    if args.json:
        _out(info.to_dict())
    else:
        _record(info.to_dict())
    return ExitCode.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """Exit 0 when every job was cancelled (or is being stopped); 1 when one had
    already finished (nothing changed for it) or is unknown."""
    if bool(args.job_ids) == bool(args.queue):
        raise _Usage(args.parser, "give job ids, or --queue Q (not both)")
    if not args.queue and (args.task or args.scheduled_only):
        raise _Usage(args.parser, "--task and --scheduled-only go with --queue")
    with _client(_load(args)) as c:
        if args.queue:
            counts = c.cancel_many(args.queue, task=args.task,
                                   scheduled_only=args.scheduled_only)
            if args.json:
                _out(counts)
            else:
                sys.stdout.write(f"cancelled {counts['cancelled']} jobs; stopping "
                                 f"{counts['cancelling']} running ones\n")
            return ExitCode.OK
        code = ExitCode.OK
        for job_id in args.job_ids:
            try:
                res = c.cancel(job_id)
            except JobNotFound:
                _err(f"no job {job_id}")
                code = ExitCode.ERROR
                continue
            if args.json:
                _out(res.to_dict())
            elif res.outcome == "cancelled":
                sys.stdout.write(f"{job_id}: cancelled (it was {res.status}; it never runs)\n")
            elif res.outcome == "cancelling":
                sys.stdout.write(f"{job_id}: running: being stopped; it ends cancelled\n")
            if res.outcome == "finished":
                if not args.json:
                    _err(f"{job_id} had already finished ({res.status}): nothing changed")
                code = ExitCode.ERROR
    return code


def cmd_pause(args: argparse.Namespace) -> int:
    with _client(_load(args)) as c:
        if args.command == "pause":
            c.pause(args.queue)
            sys.stdout.write(f"paused {args.queue}: no daemon starts its jobs (enqueues are "
                             "still accepted)\n")
        else:
            c.resume(args.queue)
            sys.stdout.write(f"resumed {args.queue}\n")
    return ExitCode.OK


def cmd_wait(args: argparse.Namespace) -> int:
    """Print the result (exit 0); exit 1 for a dead or cancelled job, 124 at the timeout."""
    with _client(_load(args)) as c:
        try:
            result = c.wait(args.job_id, args.timeout_s)
        except TimeoutError:
            _err(f"{args.job_id} did not finish within {args.timeout_s:g}s")
            return 124
        except (JobFailed, JobCancelled) as e:
            _err(str(e))
            return ExitCode.ERROR
    _out(result)
    return ExitCode.OK


def _needs_postgres(cfg: config.Config, what: str) -> None:
    if not cfg.postgres.dsn:
        raise ConfigError(f"{what} needs postgres.dsn", path=cfg.path, key="postgres.dsn")


def cmd_publish(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    from jobqd.publish import publish_config  # noqa: PLC0415

    asyncio.run(publish_config(cfg))
    sys.stdout.write(f"published {len(cfg.tasks)} tasks on {len(cfg.queues)} queues under "
                     f"prefix {cfg.redis.prefix!r}\n")
    return ExitCode.OK


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _needs_postgres(cfg, "jobqd migrate")
    from jobqd import pg  # noqa: PLC0415

    try:
        applied = asyncio.run(pg.migrate_cli(cfg))
    except pg.PgSetupError as e:  # a missing database or role (78), PostgreSQL down (69)
        _err(str(e))
        return e.exit_code
    sys.stdout.write(f"applied migrations: {applied}\n" if applied else "schema up to date\n")
    return ExitCode.OK


def cmd_recover(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _needs_postgres(cfg, "jobqd recover")
    from jobqd import relay  # noqa: PLC0415

    _out(asyncio.run(relay.report(cfg) if args.report else relay.recover(cfg)))
    return ExitCode.OK


def _dlq_queues(c: SyncClient, cfg: config.Config, queue: str | None) -> list[str]:
    """The queues a dlq command works on; an unknown ``--queue`` is an error (exit 4)."""
    known: list[str] = _op(c, ops.known_queues(c.prefix))
    if queue is None:
        return known
    if queue not in known and queue not in cfg.queues:
        raise ops.UnknownQueue(queue)
    return [queue]


def _not_dead(c: SyncClient, ref: str, verb: str) -> int:
    """A dlq command named a job that has no dead-letter entry: say what it is instead."""
    try:
        info = c.status(ref) if "/" not in ref else None
    except JobNotFound:
        info = None
    if info is None or info.status == "dead":
        _err(f"no job {ref!r} in the dead-letter queue")
    else:
        _err(f"job {ref} is {info.status}, not dead: only dead-letter entries can be {verb} "
             f"(see `jobqd status {ref}`)")
    return ExitCode.ERROR


def _dlq_entries(c: SyncClient, queues: Sequence[str], limit: int | None
                 ) -> Iterator[ops.DeadJob]:
    """Dead-letter entries, queue by queue, fetched a page at a time (never all at once)."""
    shown = 0
    for q in queues:
        after: str | None = None
        while limit is None or shown < limit:
            want = _PAGE if limit is None else min(_PAGE, limit - shown)
            page: list[ops.DeadJob] = _op(c, ops.dlq_page(c.prefix, q, after, want))
            yield from page
            shown += len(page)
            if len(page) < want:
                break
            after = page[-1].entry_id


def _dlq_list(args: argparse.Namespace, c: SyncClient, cfg: config.Config) -> int:
    queues = _dlq_queues(c, cfg, args.queue)
    total = sum(_op(c, ops.dlq_totals(c.prefix, queues)).values())
    limit = None if args.all else args.limit
    shown = 0
    for d in _dlq_entries(c, queues, limit):
        shown += 1
        row = d.to_dict()
        if args.json:
            row.pop("traceback", None)
            _line(row)
        else:
            sys.stdout.write(f"{row['id']}  {row['queue']}  {row['task']}  {row['reason']}  "
                             f"attempts={row['attempts']}  died={iso(row['died_at'])}  "
                             f"{(row['error'] or '')[:80]}\n")
    total = max(total, shown)
    if shown < total:
        note = (f"showing {shown} of {total} dead-letter entries (--limit N shows more, "
                "--all shows every one)")
        if args.json:  # keep stdout one JSON object a line
            _err(note)
        else:
            sys.stdout.write(note + "\n")
    elif not args.json:
        sys.stdout.write(f"{total} dead-letter entries\n")
    return ExitCode.OK


def _confirm(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _dlq_purge(args: argparse.Namespace, c: SyncClient, cfg: config.Config) -> int:
    if args.id:
        try:
            c.dlq_delete(args.id)
        except JobNotFound:
            return _not_dead(c, args.id, "purged")
        sys.stdout.write(f"deleted {args.id}\n")
        return ExitCode.OK
    queues = _dlq_queues(c, cfg, args.queue)
    count = sum(_op(c, ops.dlq_totals(c.prefix, queues)).values())
    where = f" of queue {args.queue!r}" if args.queue else ""
    if count and not args.yes and not _confirm(f"delete {count} dead-letter entries{where}?"):
        sys.stderr.write("jobqd: nothing deleted\n")
        return ExitCode.ERROR
    sys.stdout.write(f"purged {c.dlq_purge(args.queue)} dead-letter entries{where}\n")
    return ExitCode.OK


def cmd_dlq(args: argparse.Namespace) -> int:
    # argument combinations that make no sense, before touching Redis
    if args.dlq_cmd == "replay":
        if args.id and args.all:
            raise _Usage(args.parser, "give an ID or --all, not both")
        if not args.id and not args.all:
            raise _Usage(args.parser, "dlq replay needs an ID or --all")
        if args.id and args.queue:
            raise _Usage(args.parser, "--queue goes with --all, not with an ID")
    if args.dlq_cmd == "purge":
        if args.id and args.all:
            raise _Usage(args.parser, "give an ID or --all, not both")
        if not args.id and not args.all:
            raise _Usage(args.parser, "dlq purge needs an ID, or --all (with --queue Q: "
                         "every dead job of that queue)")
        if args.id and args.queue:
            raise _Usage(args.parser, "--queue goes with --all, not with an ID")
        if args.all and not args.yes and not sys.stdin.isatty():
            raise _Usage(args.parser, "dlq purge --all deletes dead jobs for good: add --yes "
                         "(stdin is not a terminal, so there is no one to ask)")
    cfg = _load(args)
    with _client(cfg) as c:
        if args.dlq_cmd == "list":
            return _dlq_list(args, c, cfg)
        if args.dlq_cmd == "show":
            try:
                row = c.dlq_show(args.id).to_dict()
            except JobNotFound:
                return _not_dead(c, args.id, "shown")
            if args.json:
                _out(row)
            else:
                _record(row)
        elif args.dlq_cmd == "replay":
            if args.all:
                _dlq_queues(c, cfg, args.queue)  # an unknown --queue is an error
                replayed, skipped = c.dlq_replay_all(args.queue)
                sys.stdout.write(f"replayed {replayed} jobs")
                sys.stdout.write(f"; {skipped} malformed entries cannot be replayed (see "
                                 "`jobqd dlq list`)\n" if skipped else "\n")
            else:
                try:
                    sys.stdout.write(f"replayed {c.dlq_replay(args.id)}\n")
                except JobNotFound:
                    return _not_dead(c, args.id, "replayed")
        elif args.dlq_cmd == "purge":
            return _dlq_purge(args, c, cfg)
    return ExitCode.OK


def cmd_weights(args: argparse.Namespace) -> int:
    cfg = _load(args)
    with _client(cfg) as c:
        if args.weights_cmd == "set":
            changes: dict[str, int] = {}
            for item in args.assignments:
                name, sep, value = item.partition("=")
                if not sep or not value.strip().isdigit():
                    raise _Usage(args.parser, f"expected QUEUE=WEIGHT (a whole number >= 0), "
                                 f"got {item!r}")
                changes[name] = int(value)
            # queues declared in the config file we were given are known, published or not
            weights = _op(c, ops.weights_set(c.prefix, changes, declared=tuple(cfg.queues)))
        else:
            weights = c.weights()
    for q, w in sorted(weights.items()):
        sys.stdout.write(f"{q}={w}\n")
    return ExitCode.OK


def _draw_stats(args: argparse.Namespace, queues: list[ops.QueueStats],
                rates: dict[str, float], workers: list[dict[str, Any]]) -> None:
    if args.json:
        doc = {"queues": [dict(q.to_dict(), rate_per_s=rates[q.name]) for q in queues],
               "workers": workers}
        if args.watch:
            _line(dict(doc, time=time.time()))
        else:
            _out(doc)
        return
    w = sys.stdout.write
    if args.watch:
        if sys.stdout.isatty():
            w("\x1b[H\x1b[2J")  # home + clear: redraw in place
        w(f"jobqd stats  {iso(time.time())}  (every {args.watch:g}s; Ctrl-C to stop)\n\n")
    w(f"{'QUEUE':<16}{'DEPTH':>9}{'WAITING':>9}{'RUNNING':>9}{'SCHED':>8}{'DEAD':>7}"
      f"{'LAG S':>8}{'RATE/S':>9}{'WEIGHT':>8}  ACCEPTING\n")
    for q in queues:
        w(f"{q.name:<16}{q.depth:>9}{q.waiting:>9}{q.in_flight:>9}{q.scheduled:>8}{q.dead:>7}"
          f"{q.lag_s:>8.1f}{rates[q.name]:>9.1f}{q.weight if q.weight is not None else '-':>8}"
          f"  {'yes' if q.accepting else 'NO (over high watermark)'}"
          f"{'  PAUSED' if q.paused else ''}\n")
    w(f"\n{'WORKER':<40}{'HOST':<20}{'PID':>8}{'HEARTBEAT':>11}{'BUSY':>10}\n")
    for wk in workers:
        age = wk.get("heartbeat_age_s")
        beat = "-" if age is None else f"{age:.1f}s ago"
        busy = f"{wk.get('running', '?')}/{wk.get('capacity', '?')}"
        w(f"{wk['name']!s:<40}{wk.get('host', '')!s:<20}{wk.get('pid', '')!s:>8}{beat:>11}"
          f"{busy:>10}\n")
    if not workers:
        w("(no live workers)\n")
    total_dead = sum(q.dead for q in queues)
    w(f"\ndead-letter entries: {total_dead}" + (" (see `jobqd dlq list`)\n" if total_dead
                                                else "\n"))


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = _load(args)
    period = args.watch or args.interval_s
    # Ctrl-C ends --watch. Its KeyboardInterrupt alone is not enough: one that lands
    # inside asyncio.run (reading the workers) becomes a cancellation there, and a
    # library that swallows it would lose the Ctrl-C, leaving the loop running.
    interrupted = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        interrupted.set()
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint) if args.watch else None
    try:
        with _client(cfg) as c:
            before = {q.name: q.done for q in c.queues()}
            t0 = time.monotonic()
            while not interrupted.is_set():
                time.sleep(period)
                queues = c.queues()
                t1 = time.monotonic()
                rates = {q.name: (q.done - before.get(q.name, q.done)) / (t1 - t0)
                         for q in queues}
                _draw_stats(args, queues, rates, _workers(cfg))
                sys.stdout.flush()
                if not args.watch:
                    return ExitCode.OK
                before, t0 = {q.name: q.done for q in queues}, t1
    except KeyboardInterrupt:
        if args.watch:  # Ctrl-C is how --watch ends
            return ExitCode.OK
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return ExitCode.OK


def cmd_schedules(args: argparse.Namespace) -> int:
    cfg = _load(args)

    async def read() -> list[dict[str, Any]]:

        from jobqd import schedules  # noqa: PLC0415

        r = connect.connect(cfg.redis_url)
        try:
            return await schedules.describe(r, cfg)
        finally:
            await r.aclose()

    rows = asyncio.run(read())
    if args.json:
        _out({"schedules": rows})
        return ExitCode.OK
    if not rows:
        sys.stdout.write("no schedules in the config\n")
        return ExitCode.OK
    cols = ("name", "task", "expression", "timezone", "next_run", "last_run", "last_job_id",
            "last_job_status")
    table = [["disabled" if c == "next_run" and not row["enabled"] else
              iso(row[c]) if c in ("next_run", "last_run") else _text_value(c, row[c])
              for c in cols] for row in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    for line in ([c.upper() for c in cols], *table):
        sys.stdout.write("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True))
                         .rstrip() + "\n")
    return ExitCode.OK


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.dir)
    share = resources.files("jobqd") / "share"
    existing = [target / rel for rel, _ in SHARE_FILES if (target / rel).exists()]
    if existing and not args.force:
        for path in existing:
            _err(f"{path} exists; not overwriting it (use --force to replace it)")
        return ExitCode.ERROR
    for rel, _ in SHARE_FILES:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(share.joinpath(*rel.split("/")).read_bytes())
        sys.stdout.write(f"wrote {dest}\n")
    cfg_path = target / "jobqd.yaml"
    sys.stdout.write(
        f"\nnext: edit {cfg_path}, then\n"
        f"  jobqd -c {cfg_path} check-config\n"
        f"  jobqd -c {cfg_path} run\n"
        f"The systemd unit reads /etc/jobqd.yaml (its ExecStart= and JOBQD_CONFIG): copy the "
        f"config there,\nor change both in a drop-in (systemctl edit jobqd).\n")
    return ExitCode.OK


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab  # noqa: PLC0415 - only needed here

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return ExitCode.OK


def _workers(cfg: config.Config) -> list[dict[str, Any]]:
    """Live workers (heartbeat younger than heartbeat.timeout_s), from either store."""

    async def read() -> list[dict[str, object]]:
        if cfg.postgres.dsn:  # heartbeats live in PostgreSQL
            from jobqd import pg  # noqa: PLC0415

            return await pg.list_workers(cfg)

        from jobqd.heartbeat import RedisHeartbeats  # noqa: PLC0415

        r = connect.connect(cfg.redis_url)
        try:
            return await RedisHeartbeats(r, cfg.redis.prefix).workers()
        finally:
            await r.aclose()

    rows = asyncio.run(read())
    live = [dict(w) for w in rows if isinstance(age := w.get("heartbeat_age_s"), int | float)
            and age < cfg.heartbeat.timeout_s]
    return sorted(live, key=lambda w: str(w["name"]))


# ---------------------------------------------------------------- parser

_CONFIG_HELP = "config file (default: $JOBQD_CONFIG, else /etc/jobqd.yaml)"


def _common() -> argparse.ArgumentParser:
    """Options every subcommand takes, so ``jobqd run -c FILE`` works like ``jobqd -c FILE
    run``. SUPPRESS: a subcommand that is not given ``-c`` keeps the top-level value."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="FILE",
                   help=_CONFIG_HELP)
    return c


def _add(sub: Any, name: str, help: str, description: str, example: str, *,
         fn: Callable[[argparse.Namespace], int] | None = None) -> argparse.ArgumentParser:
    """A subcommand with a description, an example (the epilog) and ``-c``."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description, parents=[_common()],
        epilog="example:\n" + "\n".join(f"  {x}" for x in example.strip().splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(parser=parser)
    if fn is not None:
        parser.set_defaults(fn=fn)
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jobqd", description="jobqd: a job-queue daemon on Redis Streams.",
                epilog="`jobqd COMMAND --help` describes each command, with an example.\n"
                       "No config yet? `jobqd init DIR` writes the example config, the systemd "
                       "unit,\nthe alert rules and the Grafana dashboard into DIR.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default=None, metavar="FILE", help=_CONFIG_HELP)
    p.add_argument("--version", action="version", version=f"jobqd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                           parser_class=_Parser)

    _add(sub, "run", "run the daemon",
         "Run the daemon in the foreground (systemd runs it so). SIGTERM or SIGINT drains "
         "it;\nSIGHUP or saving the config file reloads it.",
         "jobqd -c /etc/jobqd.yaml run", fn=cmd_run)
    _add(sub, "check-config", "validate the config (imports every handler) and print it "
         "with secrets masked",
         "Load the config as the daemon would (every handler is imported) and print the\n"
         "effective config with secrets masked. Exit 78 names the file, key and line of an "
         "error.", "jobqd check-config -c /etc/jobqd.yaml", fn=cmd_check_config)

    e = _add(sub, "enqueue", "enqueue a job; prints its id",
             "Enqueue one job and print its id. ARGS_JSON is a JSON object of keyword\n"
             "arguments; @FILE reads it from a file and - from stdin.",
             """jobqd enqueue hello '{"name": "world"}'
echo '{"name": "from stdin"}' | jobqd enqueue hello - --delay-s 60""", fn=cmd_enqueue)
    e.add_argument("task", metavar="TASK", help="a task named under tasks: in the config")
    e.add_argument("args_json", nargs="?", metavar="ARGS_JSON",
                   help="keyword arguments as a JSON object, @FILE, or - (stdin)")
    e.add_argument("--queue", metavar="Q", help="override the task's queue")
    e.add_argument("--delay-s", type=_delay_s, metavar="S",
                   help="run no sooner than S seconds from now (0 to ten years)")
    e.add_argument("--idempotency-key", metavar="K", help="the same key gives the same job")
    e.add_argument("--wait", action="store_true", help="wait while the queue is full")
    e.add_argument("--timeout-s", type=_positive_float, metavar="T",
                   help="with --wait: give up after T seconds")
    e.add_argument("--expires-s", type=_positive_float, metavar="S",
                   help="not started S seconds after it is due: never run (dead, expired)")

    cx = _add(sub, "cancel", "cancel jobs: by id, or every unfinished job of a queue",
              "Cancel jobs. A queued or scheduled job is removed and never runs; a running\n"
              "one is stopped wherever it runs (an async handler at its next await, a plain\n"
              "def when it checks current_job().cancelled) and ends cancelled, never\n"
              "retried. Exit 1 when a job had already finished (nothing changes for it).",
              """jobqd cancel 01JD5W9X4Q6V7ZB5S0J8M2N3KQ-default
jobqd cancel --queue bulk --task checksum --scheduled-only""", fn=cmd_cancel)
    cx.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    cx.add_argument("--queue", metavar="Q", help="every unfinished job of this queue")
    cx.add_argument("--task", metavar="T", help="with --queue: only this task's jobs")
    cx.add_argument("--scheduled-only", action="store_true",
                    help="with --queue: only delayed jobs and jobs waiting for a retry")
    cx.add_argument("--json", action="store_true", help="one JSON object per job (or counts)")
    for verb, what in (("pause", "stop starting a queue's jobs (enqueues still accepted)"),
                       ("resume", "start a paused queue's jobs again")):
        pz = _add(sub, verb, what,
                  f"{what[0].upper()}{what[1:]}, on every daemon within "
                  "weights.refresh_interval_s.", f"jobqd {verb} bulk", fn=cmd_pause)
        pz.add_argument("queue", metavar="QUEUE")
    wt = _add(sub, "wait", "wait for a job to finish and print its result",
              "Wait until the job ends (pushed by Redis, not polled) and print its result as\n"
              "JSON. Exit 1 for a dead or cancelled job (its reason on stderr), 124 at the\n"
              "timeout.", "jobqd wait 01JD5W9X4Q6V7ZB5S0J8M2N3KQ-default --timeout-s 30",
              fn=cmd_wait)
    wt.add_argument("job_id", metavar="JOB_ID")
    wt.add_argument("--timeout-s", type=_positive_float, metavar="T", help="give up after T s")

    s = _add(sub, "status", "a job's status (--json: as JSON)",
             "Print what jobqd knows about one job: status, attempts, result or error, and\n"
             "its timestamps (ISO 8601 UTC; seconds since the epoch with --json).",
             "jobqd status 01JD5W9X4Q6V7ZB5S0J8M2N3KQ-default --json", fn=cmd_status)
    s.add_argument("job_id", metavar="JOB_ID")
    s.add_argument("--json", action="store_true", help="the record as one JSON object")

    d = _add(sub, "dlq", "the dead-letter queue: list, show, replay, purge",
             "Inspect and act on dead jobs (failed for good, or lost with their worker too "
             "often).", "jobqd dlq list --queue critical\njobqd dlq replay --all", fn=cmd_dlq)
    dsub = d.add_subparsers(dest="dlq_cmd", metavar="COMMAND", title="commands",
                            parser_class=_Parser)
    d.set_defaults(group=d, group_dest="dlq_cmd")
    dl = _add(dsub, "list", "list dead jobs",
              "List dead jobs, oldest first, a page at a time. Says \"showing N of M\" when "
              "there\nare more than --limit.",
              "jobqd dlq list --limit 50\njobqd dlq list --queue critical --json --all")
    dl.add_argument("--queue", metavar="Q", help="only this queue")
    dl.add_argument("--json", action="store_true", help="one JSON object per line")
    lim = dl.add_mutually_exclusive_group()
    lim.add_argument("--limit", type=_positive_int, default=1000, metavar="N",
                     help="show at most N entries (default 1000)")
    lim.add_argument("--all", action="store_true", help="show every entry")
    ds = _add(dsub, "show", "one dead job, with its traceback",
              "Show one dead job: why it died, its args, and the traceback as lines.",
              "jobqd dlq show 01JD5W9X4Q6V7ZB5S0J8M2N3KQ-default")
    ds.add_argument("id", metavar="ID")
    ds.add_argument("--json", action="store_true", help="the entry as one JSON object")
    dr = _add(dsub, "replay", "send dead jobs back to their queue (attempts reset)",
              "Send one dead job (ID), or every one (--all, optionally of one --queue), back "
              "to its\nqueue with its attempts reset. Replays are never refused by "
              "backpressure.",
              "jobqd dlq replay 01JD5W9X4Q6V7ZB5S0J8M2N3KQ-default\n"
              "jobqd dlq replay --all --queue critical")
    dr.add_argument("id", nargs="?", metavar="ID")
    dr.add_argument("--all", action="store_true", help="every dead job")
    dr.add_argument("--queue", metavar="Q", help="with --all: only this queue")
    dp = _add(dsub, "purge", "delete dead jobs (one ID, or --all)",
              "Delete one dead job (ID), or every one (--all, optionally of one --queue).\n"
              "--all asks first on a terminal; without a terminal it needs --yes.",
              "jobqd dlq purge 01JD5W9X4Q6V7ZB5S0J8M2N3KQ-default\n"
              "jobqd dlq purge --all --queue bulk --yes")
    dp.add_argument("id", nargs="?", metavar="ID")
    dp.add_argument("--all", action="store_true", help="every dead job (of --queue)")
    dp.add_argument("--queue", metavar="Q", help="with --all: only this queue")
    dp.add_argument("--yes", "-y", action="store_true", help="do not ask")

    w = _add(sub, "weights", "runtime queue weights: get, set",
             "Read or change queue weights for every daemon at once (they share capacity by\n"
             "weight). A change lasts until that queue's weight in the YAML changes.",
             "jobqd weights get\njobqd weights set critical=70 default=20", fn=cmd_weights)
    wsub = w.add_subparsers(dest="weights_cmd", metavar="COMMAND", title="commands",
                            parser_class=_Parser)
    w.set_defaults(group=w, group_dest="weights_cmd")
    _add(wsub, "get", "print each queue's weight", "Print each queue's weight, one "
         "QUEUE=WEIGHT a line.", "jobqd weights get")
    wset = _add(wsub, "set", "change weights for every daemon",
                "Change queue weights for every daemon. A queue must be served by a daemon "
                "or\ndeclared in the config file given with -c.",
                "jobqd weights set critical=70 default=20")
    wset.add_argument("assignments", nargs="+", metavar="QUEUE=WEIGHT")

    _add(sub, "publish", "publish the routing to Redis without running a daemon",
         "Publish the routing (task -> queue) and queue settings to Redis without running a\n"
         "daemon: a deploy step, so producers can enqueue before the first daemon starts.",
         "jobqd -c /etc/jobqd.yaml publish", fn=cmd_publish)
    _add(sub, "migrate", "apply PostgreSQL schema migrations (also done at start)",
         "Apply the PostgreSQL schema migrations (needs postgres.dsn). Daemons do this at "
         "start too;\nan advisory lock lets several run at once.", "jobqd migrate", fn=cmd_migrate)
    rc = _add(sub, "recover", "after Redis data loss: re-publish unfinished outbox jobs",
              "After Redis lost data: re-publish every unfinished outbox job that Redis no "
              "longer\nholds (needs postgres.dsn). Idempotent. With --report, only list the "
              "jobs the\nledger saw accepted and never finish that Redis no longer holds.",
              "jobqd recover\njobqd recover --report", fn=cmd_recover)
    rc.add_argument("--report", action="store_true", help="only list the jobs the ledger saw "
                    "accepted and never finish that Redis no longer holds")

    st = _add(sub, "stats", "queues, workers and dead letters on one screen",
              "Queues (depth, rate, lag, weight, accepting), live workers and dead letters.\n"
              "--watch redraws until Ctrl-C.", "jobqd stats\njobqd stats --watch 5", fn=cmd_stats)
    st.add_argument("--json", action="store_true", help="as JSON (--watch: one line a frame)")
    st.add_argument("--interval-s", type=_positive_float, default=1.0, metavar="S",
                    help="rate sampling window (default 1)")
    st.add_argument("--watch", nargs="?", const=2.0, type=_positive_float, metavar="SECONDS",
                    help="redraw every SECONDS (default 2) until Ctrl-C")

    sc = _add(sub, "schedules", "schedules: expression, next run, last run and its job",
              "Every schedule in the config: task, expression, time zone, next run, and the\n"
              "last run with its job id and status (read from Redis).",
              "jobqd schedules\njobqd schedules --json", fn=cmd_schedules)
    sc.add_argument("--json", action="store_true", help="as JSON")

    i = _add(sub, "init", "write the example config, systemd unit, alerts and dashboard",
             "Write the files jobqd ships into DIR (default: the current directory):\n"
             + "".join(f"  DIR/{rel}\n" for rel, _ in SHARE_FILES)
             + "An existing file is never overwritten without --force.",
             "jobqd init /etc/jobqd && jobqd -c /etc/jobqd/jobqd.yaml check-config", fn=cmd_init)
    i.add_argument("dir", nargs="?", default=".", metavar="DIR")
    i.add_argument("--force", action="store_true", help="overwrite files that exist")

    comp = _add(sub, "completion", "print a shell completion script",
                "Print a completion script for bash, zsh or tcsh (generated by shtab).",
                "jobqd completion bash | sudo tee /etc/bash_completion.d/jobqd\n"
                "jobqd completion zsh > ~/.zfunc/_jobqd", fn=cmd_completion)
    comp.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    return p


_ERRORS: list[tuple[type[BaseException], ExitCode, Callable[[BaseException], str]]] = [
    (QueueFull, ExitCode.QUEUE_FULL, str),
    (UnknownTask, ExitCode.UNKNOWN_TASK, str),
    (JobNotFound, ExitCode.ERROR, str),
    (PayloadTooLarge, ExitCode.USAGE, str),
    (RedisOutOfMemory, ExitCode.REDIS_OOM, str),
    (NotReplicated, ExitCode.UNAVAILABLE, str),
    (OutOfMemoryError, ExitCode.REDIS_OOM, lambda e: f"redis is out of memory: {e}"),
    (BadJob, ExitCode.ERROR, str),
    (TypeError, ExitCode.USAGE, str),
    (ValueError, ExitCode.USAGE, str),
    (RedisError, ExitCode.UNAVAILABLE, lambda e: f"cannot reach redis: {e}"),
    (OSError, ExitCode.UNAVAILABLE, lambda e: f"cannot connect: {e}"),
]


def _no_config(command: str, path: str) -> str:
    return (f"no config file: no -c FILE, no $JOBQD_CONFIG, and {path} does not exist.\n"
            f"  Write the example config (with the systemd unit, alert rules and dashboard):\n"
            f"    jobqd init /etc/jobqd\n"
            f"    jobqd -c /etc/jobqd/jobqd.yaml {command}\n"
            f"  or use a config of your own:  jobqd -c FILE {command}")


def _stdout_gone() -> None:
    """stdout's reader went away (`| head`): point fd 1 at /dev/null so the interpreter's
    final flush does not complain too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # not a real file (e.g. captured in tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (64), --help and --version (0)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    group = getattr(args, "group", None)  # `jobqd dlq` without its subcommand
    if group is not None and getattr(args, args.group_dest) is None:
        group.print_help(sys.stderr)
        return ExitCode.USAGE
    if args.command not in NO_CONFIG_COMMANDS and args.config is None:
        args.config = config.default_path()
        if not os.environ.get("JOBQD_CONFIG") and not Path(args.config).exists():
            _err(_no_config(args.command, args.config))
            return ExitCode.CONFIG
    if args.command != "run":
        logging.basicConfig(level=logging.WARNING, format="jobqd: %(message)s")
    try:
        code = int(args.fn(args))
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except BrokenPipeError:  # the reader of stdout went away (`jobqd ... | head`): quietly
        _stdout_gone()
        return ExitCode.BROKEN_PIPE
    except _Usage as e:
        e.parser.print_usage(sys.stderr)
        sys.stderr.write(f"{e.parser.prog}: error: {e}\n")
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return 130
    except ConfigError as e:
        _err(f"config error: {e}")
        return ExitCode.CONFIG
    except Exception as e:
        if args.command == "run":  # a bug: say so loudly, let systemd restart us
            log.exception("jobqd crashed")
            return ExitCode.SOFTWARE
        for kind, code_, fmt in _ERRORS:
            if isinstance(e, kind):
                _err(fmt(e))
                return code_
        raise
