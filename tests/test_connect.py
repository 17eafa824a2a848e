"""jobqd.connect: what each redis URL form names, and the clear error for a bad one.
(The real cluster and sentinel deployments are exercised in test_cluster.py and
test_sentinel.py.)"""

from __future__ import annotations

import pytest

from jobqd import connect
from jobqd.config import mask_url


def test_single_server_forms_pass_through() -> None:
    for url in ("redis://localhost:6379/0", "rediss://u:p@h:6380/1", "unix:///tmp/r.sock"):
        t = connect.parse(url)
        assert t.kind == "single" and t.url == url
    assert connect.parse("rediss://h").ssl


def test_cluster_seed_nodes_credentials_and_tls() -> None:
    t = connect.parse("rediss+cluster://u:p%40ss@[::1]:7000,h2,h3:7002")
    assert t.kind == "cluster" and t.ssl
    assert t.nodes == (("::1", 7000), ("h2", 6379), ("h3", 7002))
    assert (t.username, t.password) == ("u", "p@ss")


def test_sentinel_master_db_and_sentinel_password() -> None:
    t = connect.parse("redis+sentinel://:pw@h1:26380,h2/mymaster/2?sentinel_password=sp")
    assert t.kind == "sentinel" and not t.ssl
    assert t.nodes == (("h1", 26380), ("h2", 26379))
    assert (t.master, t.db, t.password, t.sentinel_password) == ("mymaster", 2, "pw", "sp")


@pytest.mark.parametrize(("url", "words"), [
    ("http://x", "scheme must be"),
    ("redis+sentinel://h1:26379", "needs the master's name"),
    ("redis+sentinel://h1/m/x", "database number"),
    ("redis+cluster://h:1/3", "only database 0"),
    ("redis+cluster://h:port", "port must be a number"),
    ("redis+cluster://h:1,,h2:2", "empty host"),
    ("redis+cluster://h:1?x=1", "unknown option"),
    ("redis+sentinel://h/m?nope=1", "unknown option"),
    ("redis+cluster://h:70000", "not a host:port"),
])
def test_bad_urls_say_why(url: str, words: str) -> None:
    with pytest.raises(connect.TargetError, match=words):
        connect.parse(url)
    assert words in (connect.check(url) or "")


def test_passwords_are_masked_in_every_form() -> None:
    masked = mask_url("redis+sentinel://:pw@h1:26379,h2/m?sentinel_password=sp")
    assert "pw" not in masked.replace("password", "") and "sp" not in masked
    assert "secret" not in mask_url("redis+cluster://u:secret@h1:7000,h2:7001")


def test_clients_of_each_kind() -> None:
    from redis.asyncio.cluster import RedisCluster

    c = connect.connect("redis+cluster://127.0.0.1:1")  # lazy: no connection yet
    assert isinstance(c, RedisCluster) and connect.is_cluster(c)
    s = connect.connect("redis+sentinel://127.0.0.1:1/m")
    assert not connect.is_cluster(s)
    assert not connect.is_cluster(connect.connect_sync("redis://127.0.0.1:1"))
