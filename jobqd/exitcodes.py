"""Named process exit codes (sysexits.h numbering where one fits).

systemd's ``RestartPreventExitStatus=64 78`` stops a restart loop on a usage
or configuration error; every other failure is worth a restart.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0  # clean exit, including a completed graceful drain
    ERROR = 1  # a generic failure (CLI: the operation failed, e.g. job not found)
    FORCED = 2  # a second SIGTERM/SIGINT forced exit before the drain finished
    QUEUE_FULL = 3  # `jobqd enqueue`: the queue is over its high watermark
    UNKNOWN_TASK = 4  # no daemon routes that task (or serves that queue: enqueue, weights)
    USAGE = 64  # EX_USAGE: bad command-line arguments or input (e.g. ARGS_JSON)
    UNAVAILABLE = 69  # EX_UNAVAILABLE: cannot connect to Redis / PostgreSQL at start, or the
    # environment lacks what jobqd needs (no redis-server to embed, no Lua struct in Redis)
    SOFTWARE = 70  # EX_SOFTWARE: a component crashed (bug); systemd restarts it
    REDIS_OOM = 75  # EX_TEMPFAIL: Redis is out of memory (noeviction); retry later
    CONFIG = 78  # EX_CONFIG: the config file is missing, malformed or invalid
    BROKEN_PIPE = 141  # CLI: stdout was closed by its reader (`| head`): 128 + SIGPIPE, quietly
