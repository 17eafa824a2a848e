"""The `jobqd` command line.

Config: ``-c FILE``, else ``$JOBQD_CONFIG``, else ``/etc/jobqd.yaml``. Every
command exits with a named code (`jobqd.exitcodes.ExitCode`), so scripts and
systemd can tell a config error (78) from an unreachable Redis (69).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import orjson
import yaml
from redis.exceptions import RedisError

from jobqd import __version__, config, logs
from jobqd.client import SyncClient
from jobqd.errors import ConfigError, JobNotFound, PayloadTooLarge, QueueFull, UnknownTask
from jobqd.exitcodes import ExitCode
from jobqd.jobs import BadJob

log = logging.getLogger("jobqd.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def _out(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def _line(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")


def _err(msg: str) -> None:
    sys.stderr.write(f"jobqd: {msg}\n")


def _client(args: argparse.Namespace) -> SyncClient:
    cfg = config.load(args.config, import_handlers=False)
    return SyncClient(cfg.redis_url, cfg.redis.prefix, idempotency_ttl_s=cfg.idempotency_ttl_s)


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


def cmd_enqueue(args: argparse.Namespace) -> int:
    try:
        job_args = orjson.loads(args.args_json) if args.args_json else None
    except orjson.JSONDecodeError as e:
        _err(f"ARGS_JSON is not valid JSON: {e}")
        return ExitCode.USAGE
    if job_args is not None and not isinstance(job_args, dict):
        _err("ARGS_JSON must be a JSON object of keyword arguments, e.g. '{\"to\": \"a@b.c\"}'")
        return ExitCode.USAGE
    with _client(args) as c:
        job = c.enqueue(args.task, job_args, queue=args.queue, delay_s=args.delay_s,
                        idempotency_key=args.idempotency_key, wait=args.wait,
                        timeout_s=args.timeout_s)
    sys.stdout.write(job.id + "\n")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, import_handlers=False)
    with SyncClient(cfg.redis_url, cfg.redis.prefix) as c:
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
    _out(info.to_dict())
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
    cfg = config.load(args.config, import_handlers=False)
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
    cfg = config.load(args.config, import_handlers=False)
    _needs_postgres(cfg, "jobqd recover")
    from jobqd import outbox  # noqa: PLC0415

    _out(asyncio.run(outbox.recover(cfg)))
    return ExitCode.OK


def cmd_dlq(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.dlq_cmd == "list":
            dead = c.dlq_list(args.queue, limit=args.limit)
            for d in dead:
                row = d.to_dict()
                if args.json:
                    row.pop("traceback", None)
                    _line(row)
                else:
                    sys.stdout.write(f"{row['id']}  {row['queue']}  {row['task']}  "
                                     f"{row['reason']}  attempts={row['attempts']}  "
                                     f"{(row['error'] or '')[:80]}\n")
            if not args.json:
                sys.stdout.write(f"{len(dead)} dead-letter entries\n")
        elif args.dlq_cmd == "show":
            _out(c.dlq_show(args.id).to_dict())
        elif args.dlq_cmd == "replay":
            if args.all:
                replayed, skipped = c.dlq_replay_all(args.queue)
                sys.stdout.write(f"replayed {replayed} jobs")
                sys.stdout.write(f"; {skipped} malformed entries cannot be replayed (see "
                                 "`jobqd dlq list`)\n" if skipped else "\n")
            elif args.id:
                sys.stdout.write(f"replayed {c.dlq_replay(args.id)}\n")
            else:
                _err("dlq replay needs an ID or --all")
                return ExitCode.USAGE
        elif args.dlq_cmd == "purge":
            if args.id:
                c.dlq_delete(args.id)
                sys.stdout.write(f"deleted {args.id}\n")
            else:
                sys.stdout.write(f"purged {c.dlq_purge(args.queue)} dead-letter entries\n")
    return ExitCode.OK


def cmd_weights(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.weights_cmd == "set":
            changes: dict[str, int] = {}
            for item in args.assignments:
                name, sep, value = item.partition("=")
                if not sep or not value.strip().isdigit():
                    _err(f"expected QUEUE=WEIGHT (a whole number >= 0), got {item!r}")
                    return ExitCode.USAGE
                changes[name] = int(value)
            weights = c.set_weights(changes)
        else:
            weights = c.weights()
    for q, w in sorted(weights.items()):
        sys.stdout.write(f"{q}={w}\n")
    return ExitCode.OK


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, import_handlers=False)
    with SyncClient(cfg.redis_url, cfg.redis.prefix) as c:
        first = {q.name: q.done for q in c.queues()}
        t0 = time.monotonic()
        time.sleep(args.interval_s)
        queues = c.queues()
        elapsed = time.monotonic() - t0
        workers = _workers(cfg)
    if args.json:
        _out({"queues": [dict(q.to_dict(), rate_per_s=(q.done - first.get(q.name, q.done))
                              / elapsed) for q in queues], "workers": workers})
        return ExitCode.OK
    w = sys.stdout.write
    w(f"{'QUEUE':<16}{'DEPTH':>9}{'WAITING':>9}{'RUNNING':>9}{'SCHED':>8}{'DEAD':>7}"
      f"{'LAG S':>8}{'RATE/S':>9}{'WEIGHT':>8}  ACCEPTING\n")
    for q in queues:
        rate = (q.done - first.get(q.name, q.done)) / elapsed
        w(f"{q.name:<16}{q.depth:>9}{q.waiting:>9}{q.in_flight:>9}{q.scheduled:>8}{q.dead:>7}"
          f"{q.lag_s:>8.1f}{rate:>9.1f}{q.weight if q.weight is not None else '-':>8}  "
          f"{'yes' if q.accepting else 'NO (over high watermark)'}\n")
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
    return ExitCode.OK


def _workers(cfg: config.Config) -> list[dict[str, Any]]:
    """Live workers (heartbeat younger than heartbeat.timeout_s), from either store."""

    async def read() -> list[dict[str, object]]:
        if cfg.postgres.dsn:  # heartbeats live in PostgreSQL
            from jobqd import pg  # noqa: PLC0415

            return await pg.list_workers(cfg)
        import redis.asyncio as aredis  # noqa: PLC0415

        from jobqd.heartbeat import RedisHeartbeats  # noqa: PLC0415
        from jobqd.runtime import Runtime  # noqa: PLC0415

        r = aredis.Redis.from_url(cfg.redis_url)
        try:
            return await RedisHeartbeats(Runtime(config=cfg, redis=r)).workers()
        finally:
            await r.aclose()

    rows = asyncio.run(read())
    live = [dict(w) for w in rows if isinstance(age := w.get("heartbeat_age_s"), int | float)
            and age < cfg.heartbeat.timeout_s]
    return sorted(live, key=lambda w: str(w["name"]))


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jobqd", description="jobqd: a job-queue daemon on Redis Streams.")
    p.add_argument("-c", "--config", default=None,
                   help="config file (default: $JOBQD_CONFIG or /etc/jobqd.yaml)")
    p.add_argument("--version", action="version", version=f"jobqd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("run", help="run the daemon").set_defaults(fn=cmd_run)
    sub.add_parser("check-config", help="validate the config (imports every handler) and "
                   "print it with secrets masked").set_defaults(fn=cmd_check_config)

    e = sub.add_parser("enqueue", help="enqueue a job; prints its id")
    e.add_argument("task")
    e.add_argument("args_json", nargs="?", metavar="ARGS_JSON",
                   help="keyword arguments as a JSON object")
    e.add_argument("--queue")
    e.add_argument("--delay-s", type=float)
    e.add_argument("--idempotency-key")
    e.add_argument("--wait", action="store_true", help="wait while the queue is full")
    e.add_argument("--timeout-s", type=float, help="with --wait: give up after this long")
    e.set_defaults(fn=cmd_enqueue)

    s = sub.add_parser("status", help="print a job's status as JSON")
    s.add_argument("job_id")
    s.set_defaults(fn=cmd_status)

    d = sub.add_parser("dlq", help="the dead-letter queue")
    dsub = d.add_subparsers(dest="dlq_cmd", required=True, parser_class=_Parser)
    dl = dsub.add_parser("list", help="list dead jobs")
    dl.add_argument("--queue")
    dl.add_argument("--json", action="store_true", help="one JSON object per line")
    dl.add_argument("--limit", type=int, default=1000, help="per queue")
    ds = dsub.add_parser("show", help="one dead job, with its traceback")
    ds.add_argument("id")
    dr = dsub.add_parser("replay", help="send dead jobs back to their queue (attempts reset)")
    dr.add_argument("id", nargs="?")
    dr.add_argument("--all", action="store_true")
    dr.add_argument("--queue", help="with --all: only this queue")
    dp = dsub.add_parser("purge", help="delete dead jobs (all, one --queue, or one ID)")
    dp.add_argument("id", nargs="?")
    dp.add_argument("--queue")
    d.set_defaults(fn=cmd_dlq)

    w = sub.add_parser("weights", help="runtime queue weights")
    wsub = w.add_subparsers(dest="weights_cmd", required=True, parser_class=_Parser)
    wsub.add_parser("get", help="print each queue's weight")
    wset = wsub.add_parser("set", help="change weights for every daemon, e.g. critical=70")
    wset.add_argument("assignments", nargs="+", metavar="QUEUE=WEIGHT")
    w.set_defaults(fn=cmd_weights)

    sub.add_parser("publish", help="publish the routing and queue settings to Redis without "
                   "running a daemon (a deploy step)").set_defaults(fn=cmd_publish)
    sub.add_parser("migrate", help="apply PostgreSQL schema migrations (also done at start)"
                   ).set_defaults(fn=cmd_migrate)
    sub.add_parser("recover", help="after Redis data loss: re-publish unfinished outbox jobs "
                   "that Redis no longer holds (idempotent)").set_defaults(fn=cmd_recover)

    st = sub.add_parser("stats", help="queues, workers and dead letters on one screen")
    st.add_argument("--json", action="store_true")
    st.add_argument("--interval-s", type=float, default=1.0, help="rate sampling window")
    st.set_defaults(fn=cmd_stats)
    return p


_ERRORS: list[tuple[type[BaseException], ExitCode, Callable[[BaseException], str]]] = [
    (QueueFull, ExitCode.QUEUE_FULL, str),
    (UnknownTask, ExitCode.UNKNOWN_TASK, str),
    (JobNotFound, ExitCode.ERROR, str),
    (PayloadTooLarge, ExitCode.USAGE, str),
    (BadJob, ExitCode.ERROR, str),
    (TypeError, ExitCode.USAGE, str),
    (ValueError, ExitCode.USAGE, str),
    (RedisError, ExitCode.UNAVAILABLE, lambda e: f"cannot reach redis: {e}"),
    (OSError, ExitCode.UNAVAILABLE, lambda e: f"cannot connect: {e}"),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (64), --help and --version (0)
        return int(e.code or 0)
    if args.config is None:
        args.config = config.default_path()
    if args.command != "run":
        logging.basicConfig(level=logging.WARNING, format="jobqd: %(message)s")
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except ConfigError as e:
        _err(f"config error: {e}")
        return ExitCode.CONFIG
    except Exception as e:
        if args.command == "run":  # a bug: say so loudly, let systemd restart us
            log.exception("jobqd crashed")
            return ExitCode.SOFTWARE
        for kind, code, fmt in _ERRORS:
            if isinstance(e, kind):
                _err(fmt(e))
                return code
        raise
