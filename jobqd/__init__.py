"""jobqd: a job-queue daemon on Redis Streams that does not lose work."""

from jobqd.client import Client, SyncClient
from jobqd.errors import (
    ConfigError,
    Fail,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobqdError,
    NotReplicated,
    PayloadTooDeep,
    PayloadTooLarge,
    QueueFull,
    RedisMemoryFull,
    RedisOutOfMemory,
    Retry,
    UnknownTask,
)
from jobqd.jobs import CurrentJob, Job, JobInfo, current_job
from jobqd.ops import UnknownQueue

__version__ = "0.1.0"

__all__ = [
    "Client",
    "ConfigError",
    "CurrentJob",
    "Fail",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobInfo",
    "JobNotFound",
    "JobqdError",
    "NotReplicated",
    "PayloadTooDeep",
    "PayloadTooLarge",
    "QueueFull",
    "RedisMemoryFull",
    "RedisOutOfMemory",
    "Retry",
    "SyncClient",
    "UnknownQueue",
    "UnknownTask",
    "__version__",
    "current_job",
]
