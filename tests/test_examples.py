"""The example handlers shipped for new users (etc/jobqd.yaml) do what they say."""

from __future__ import annotations

import pytest

from jobqd import Fail, Retry, examples
from jobqd.jobs import CurrentJob, _current


@pytest.fixture
def job_context() -> object:
    token = _current.set(CurrentJob(id="01HZZZZZZZZZZZZZZZZZZZZZZZ-default", task="t",
                                    queue="default", attempt=1, enqueued_at=0.0))
    yield
    _current.reset(token)


async def test_examples(job_context: object) -> None:
    assert (await examples.hello("ann")).startswith("hello, ann (job 01HZ")
    assert len(examples.checksum("abc", rounds=3)) == 64
    assert examples.checksum("abc", 3) == examples.checksum("abc", 3)
    assert await examples.flaky(fail_rate=0.0) == "ok"
    with pytest.raises(RuntimeError):
        await examples.flaky(fail_rate=1.0)
    with pytest.raises(Fail, match="nope"):
        await examples.always_fails("nope")
    with pytest.raises(Retry):
        await examples.retry_later(0.5)
    assert examples.sleep_sync(0.0) == 0.0
    assert await examples.sleep(0.0) == 0.0
    assert await examples.noop() is None


def test_current_job_outside_a_handler() -> None:
    from jobqd import current_job

    with pytest.raises(LookupError, match="outside a jobqd handler"):
        current_job()
