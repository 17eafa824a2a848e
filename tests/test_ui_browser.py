"""The dashboard driven in a real browser: Debian's chromium through its chromedriver
(selenium; nothing is downloaded), against a real `jobqd run` subprocess with a token.

Skips with a reason when /usr/bin/chromium or /usr/bin/chromedriver is missing
(.ci/run installs both). Screenshots go to the test's tmp dir; with
JOBQD_UPDATE_SCREENSHOT=1 the overview under load is also written to docs/dashboard.png.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from jobqd import SyncClient, ops

from .conftest import REDIS_URL, ROOT, DaemonProcess, _cleanup, base_config

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "browser-s3cret"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium "
                "chromium-driver; .ci/run does)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Env:
    def __init__(self, base: str, prefix: str, driver: Any, shots: Path) -> None:
        self.base = base
        self.prefix = prefix
        self.driver = driver
        self.shots = shots
        self.client = SyncClient(REDIS_URL, prefix)
        self.r = redis.Redis.from_url(REDIS_URL)
        self.run = ops.SyncRunner(self.r).run

    def get(self, path: str) -> None:
        self.driver.get(self.base + path)
        if "/ui/login" in self.driver.current_url and not path.startswith("/ui/login"):
            self.login()  # each test works alone (-k), not only after the login test
            self.driver.get(self.base + path)

    def wait(self, pred: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
        return WebDriverWait(
            self.driver, timeout, poll_frequency=0.1,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        ).until(lambda _d: pred(), message=f"timed out waiting for {what}")

    def text(self) -> str:
        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def click(self, xpath: str) -> None:
        self.driver.find_element(By.XPATH, xpath).click()

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def login(self) -> None:
        self.get("/ui/login")
        box = self.driver.find_element(By.NAME, "token")
        box.send_keys(TOKEN)
        self.click("//button[text()='Sign in']")
        self.wait(lambda: "Overview" in self.driver.title, "the overview after login")

    def cell(self, queue: str, key: str) -> str:
        return str(self.driver.find_element(
            By.CSS_SELECTOR, f'tr[data-q="{queue}"] td[data-k="{key}"]').text)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("ui-browser")
    prefix = "t" + uuid.uuid4().hex[:12]
    port = _free_port()
    (tmp / "token").write_text(TOKEN)
    cfg = base_config(prefix, http={"listen": f"127.0.0.1:{port}",
                                    "token_file": str(tmp / "token"), "ui_payloads": True},
                      consumers=4, queues={"default": {"weight": 3}, "held": {"weight": 1},
                                           "bulk": {"weight": 1}})
    cfg["tasks"]["needs_key"] = {"handler": "tests.handlers:needs_key", "max_retries": 0}
    cfg["tasks"]["fail_with"] = {"handler": "tests.handlers:fail_with", "max_retries": 0}
    cfg["tasks"]["hold"] = {"handler": "tests.handlers:noop", "queue": "held"}
    cfg["tasks"]["slow"] = {"handler": "tests.handlers:sleep", "queue": "bulk"}
    path = tmp / "jobqd.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    daemon = DaemonProcess(path, tmp / "daemon.log").start()
    driver = None
    try:
        daemon.wait_ready(prefix)
        # "held" stays paused: its jobs wait (the daemon sees the pause while the
        # browser starts, well within weights.refresh_interval_s)
        with redis.Redis.from_url(REDIS_URL) as r:
            ops.SyncRunner(r).run(ops.set_paused(prefix, "held", True))
        os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager: never download
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1400,1000",
                    f"--user-data-dir={tempfile.mkdtemp(dir=tmp)}"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        driver.set_page_load_timeout(20)
        e = Env(f"http://127.0.0.1:{port}", prefix, driver, tmp)
        yield e
        e.client.close()
        e.r.close()
    finally:
        if driver is not None:
            driver.quit()
        daemon.stop()
        _cleanup(prefix)


def test_login_needs_the_token(env: Env) -> None:
    env.driver.delete_all_cookies()
    env.driver.get(env.base + "/ui/")
    env.wait(lambda: "/ui/login" in env.driver.current_url, "the login form")
    assert "Overview" not in env.driver.title
    env.driver.find_element(By.NAME, "token").send_keys("wrong")
    env.click("//button[text()='Sign in']")
    env.wait(lambda: "Wrong token" in env.text(), "the refusal")
    env.driver.get(env.base + "/ui/api/overview")
    assert "sign in first" in env.text()
    env.shot("login-refused")
    env.login()
    assert env.driver.get_cookie("jobqd_session")["httpOnly"] is True
    assert TOKEN not in env.driver.get_cookie("jobqd_session")["value"]


def test_overview_depth_changes_live(env: Env) -> None:
    env.get("/ui/")
    env.wait(lambda: env.cell("held", "waiting") == "0", "held at 0")
    env.driver.execute_script("window.__noReload = 1")
    env.client.enqueue_many("hold", [{}] * 37)
    env.wait(lambda: env.cell("held", "waiting") == "37", "the depth to reach 37")
    assert env.driver.execute_script("return window.__noReload") == 1  # no page reload
    assert env.cell("held", "paused") == "paused"
    env.shot("overview-depth")


def test_dead_letter_traceback_replay_succeeds(env: Env) -> None:
    key = env.prefix + ":fixed"
    job = env.client.enqueue("needs_key", {"key": key})
    deadline = time.monotonic() + 15
    while env.client.status(job.id).status != "dead" and time.monotonic() < deadline:
        time.sleep(0.05)
    env.get("/ui/dlq")
    env.click(f"//a[text()='{job.id}']")
    tb = env.wait(lambda: env.driver.find_element(By.CSS_SELECTOR, "pre.traceback").text,
                  "the traceback")
    assert "LookupError" in tb and "is not set" in tb
    env.shot("dead-letter")
    env.r.set(key, "1")  # fix the handler's input
    env.click("//button[text()='Replay']")
    env.wait(lambda: "replayed" in env.text(), "the replay")
    deadline = time.monotonic() + 15
    while env.client.status(job.id).status != "succeeded" and time.monotonic() < deadline:
        time.sleep(0.05)
    env.driver.refresh()
    env.wait(lambda: env.driver.find_element(By.CSS_SELECTOR, "b.status").text
             == "succeeded", "the job page to say succeeded")


def test_edit_a_weight(env: Env) -> None:
    env.get("/ui/weights")
    box = env.driver.find_element(By.NAME, "w:bulk")
    box.clear()
    box.send_keys("9")
    env.click("//button[text()='Save weights']")
    env.wait(lambda: "weights saved" in env.text(), "the save")
    assert env.run(ops.weights_get(env.prefix))["bulk"] == 9  # what `jobqd weights get` reads


def test_pause_a_queue_and_cancel_a_job(env: Env) -> None:
    env.get("/ui/queues/default")
    env.click("//button[text()='Pause']")
    env.wait(lambda: "default" in env.run(ops.paused_queues(env.prefix)), "the pause")
    env.wait(lambda: "Resume" in env.text(), "the queue page to offer Resume")
    assert "/ui/queues/default" in env.driver.current_url
    time.sleep(1.0)  # the daemon sees a pause within weights.refresh_interval_s (0.2 s)
    job = env.client.enqueue("noop", {})
    env.get("/ui/queues/default")
    env.click(f"//a[text()='{job.id}']")
    env.wait(lambda: env.driver.find_element(By.CSS_SELECTOR, "b.status").text == "queued",
             "the job page")
    env.click("//button[text()='Cancel job']")
    env.wait(lambda: "cancel: cancelled" in env.text(), "the cancel")
    assert env.client.status(job.id).status == "cancelled"
    env.get("/ui/queues/default")
    env.click("//button[text()='Resume']")
    env.wait(lambda: "default" not in env.run(ops.paused_queues(env.prefix)), "the resume")


def test_xss_payloads_stay_inert(env: Env) -> None:
    payload = ("<script>window.__xss=1;document.title='pwned'</script>"
               "<img src=x onerror=\"window.__xss=1;document.title='pwned'\">")
    job = env.client.enqueue("fail_with", {"message": payload})
    deadline = time.monotonic() + 15
    while env.client.status(job.id).status != "dead" and time.monotonic() < deadline:
        time.sleep(0.05)
    for path in (f"/ui/jobs/{job.id}", "/ui/dlq", f"/ui/dlq/show?ref={job.id}"):
        env.get(path)
        env.wait(lambda: env.driver.execute_script("return document.readyState")
                 == "complete", "the page")
        time.sleep(0.2)  # give a broken image's onerror its chance to fire
        assert env.driver.execute_script("return window.__xss") is None, path
        assert "pwned" not in env.driver.title, path
        assert env.driver.find_elements(By.XPATH, "//main//img") == [], path
    assert "<script>window.__xss=1" in env.text()  # shown as text
    env.shot("xss-inert")


def test_overview_under_load_screenshot(env: Env) -> None:
    env.get("/ui/")
    env.client.enqueue_many("slow", [{"seconds": 0.05}] * 600)
    env.client.enqueue_many("noop", [{}] * 300)
    env.client.enqueue("noop", {}, delay_s=3600)
    env.wait(lambda: env.cell("default", "scheduled") == "1", "the new jobs to show")
    for _ in range(3):  # three more polls (2 s apart): the charts show the load
        seen = env.driver.execute_script("return document.body.dataset.updated")
        env.wait(lambda seen=seen: env.driver.execute_script(
            "return document.body.dataset.updated") != seen, "a poll")
    assert env.driver.find_elements(By.CSS_SELECTOR, "#chart-depth path")
    path = env.shot("overview-under-load")
    if os.environ.get("JOBQD_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(path, ROOT / "docs" / "dashboard.png")
    with contextlib.suppress(Exception):
        env.client.cancel_many("bulk")
