"""The Redis key schema, in one place (documented in docs/architecture.md).

Every key of one queue shares the hash tag ``{<prefix>:<queue>}`` so a Lua
script that touches them runs on one slot (Redis Cluster ready). Global keys
(routing, weights, heartbeats, locks) are only ever touched one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "jobqd"  # the consumer group on every queue stream


@dataclass(frozen=True, slots=True)
class QueueKeys:
    prefix: str
    queue: str

    @property
    def tag(self) -> str:
        return "{" + self.prefix + ":" + self.queue + "}"

    @property
    def stream(self) -> str:  # XADD'ed jobs; length == jobs not yet acked
        return self.tag + ":s"

    @property
    def delayed(self) -> str:  # ZSET job id -> due time (ms, Redis clock)
        return self.tag + ":d"

    @property
    def state(self) -> str:  # HASH job id -> "<stream entry id>" | "d<job json>" | "x<dlq id>"
        return self.tag + ":st"

    @property
    def dlq(self) -> str:  # dead-letter STREAM, fields j (job json) and e (death json)
        return self.tag + ":dlq"

    @property
    def conf(self) -> str:  # HASH published by the daemon: t:<task>, high, low, maxp
        return self.tag + ":conf"

    @property
    def full(self) -> str:  # STRING present while the queue refuses (backpressure)
        return self.tag + ":full"

    @property
    def memfull(self) -> str:  # STRING "<used> <max> <fraction>" while Redis memory is over
        return self.tag + ":mem"  # redis.max_memory_fraction (redisguard; short PX)

    @property
    def done(self) -> str:  # counter: entries settled (succeeded, retried, dead, handed back)
        return self.tag + ":n"

    @property
    def cancel(self) -> str:  # SET job ids asked to stop while running (cleared at settle)
        return self.tag + ":cx"

    @property
    def waiters(self) -> str:  # SET job ids a client waits for (complete.lua PUBLISHes them)
        return self.tag + ":w"

    @property
    def progress(self) -> str:  # HASH job id -> progress json, while running
        return self.tag + ":pg"

    @property
    def enqueued(self) -> str:  # HASH task -> jobs enqueued, by any producer (enqueue.lua)
        return self.tag + ":in"

    def result(self, job_id: str) -> str:  # STRING final record json, expires results.ttl_s
        return self.tag + ":r:" + job_id

    def idem(self, key: str) -> str:  # STRING idempotency key -> job id
        return self.tag + ":i:" + key


@dataclass(frozen=True, slots=True)
class GlobalKeys:
    prefix: str

    @property
    def routing(self) -> str:  # HASH task -> queue (what producers route by)
        return self.prefix + ":routing"

    @property
    def queues(self) -> str:  # SET of queue names ever published
        return self.prefix + ":queues"

    @property
    def weights(self) -> str:  # HASH queue -> runtime weight
        return self.prefix + ":weights"

    @property
    def weights_seed(self) -> str:  # HASH queue -> the YAML weight last applied
        return self.prefix + ":weights:yaml"

    @property
    def heartbeats(self) -> str:  # ZSET consumer name -> last beat (ms)
        return self.prefix + ":hb"

    @property
    def workers(self) -> str:  # HASH consumer name -> worker info json
        return self.prefix + ":workers"

    @property
    def reaper_lock(self) -> str:  # STRING owner token, PX reaper lease
        return self.prefix + ":reaper:lock"

    @property
    def paused(self) -> str:  # SET of paused queues (jobqd pause / resume)
        return self.prefix + ":paused"

    @property
    def control(self) -> str:  # pub/sub channel: "cancel <job id>" to every daemon
        return self.prefix + ":control"

    @property
    def done(self) -> str:  # pub/sub channel: "<job id> <status>" for waited-for jobs
        return self.prefix + ":done"

    @property
    def schedules(self) -> str:  # HASH schedule name -> "<last tick ms> <info json>"
        return self.prefix + ":sched"

    def task_tag(self, task: str) -> str:  # hash tag of one task's limit keys
        return "{" + self.prefix + ":task:" + task + "}"

    def task_running(self, task: str) -> str:  # ZSET job id -> slot lease expiry (ms, Redis clock)
        return self.task_tag(task) + ":running"

    def task_bucket(self, task: str) -> str:  # HASH t tokens, ts refill (us), q next retry (ms)
        return self.task_tag(task) + ":bucket"

    def task_waiting(self, task: str) -> str:  # ZSET job id refused for concurrency -> retry ms
        return self.task_tag(task) + ":waiting"
