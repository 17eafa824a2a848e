"""The web dashboard at ``/ui``: server-rendered HTML on the daemon's own port.

Why server-rendered: every page is one aiohttp handler that reads through the same
operations as the CLI (`jobqd.ops`, `jobqd.schedules`, the heartbeat store), so the
dashboard cannot disagree with ``jobqd stats``; there is no build step and no
front-end dependency to keep up to date. Everything from a job (args, errors,
tracebacks, task and queue names) goes through `esc` (``html.escape``). The only
script is ``ui_static/ui.js`` (served from the package; the Content-Security-Policy
forbids inline script): it polls ``/ui/api/overview`` for live numbers and draws the
two charts as inline SVG, shows timestamps in the viewer's local time and asks for a
confirmation before bulk actions.

History for the charts lives in this process: a bounded ring buffer (one sample per
`SAMPLE_EVERY_S`, an hour long) that grows only when the overview endpoint is polled,
so the dashboard adds no Redis load while nobody has it open.

Auth (when ``http.token_file`` is set): the bearer header, or a session cookie set by
the login form (HttpOnly, SameSite=Strict; it holds an HMAC of the token, never the
token). Every state-changing action is a POST carrying a CSRF token (double submit:
a random cookie echoed in a form field, compared in constant time); a request
authenticated by the bearer header needs none (a browser never adds that header by
itself). ``http.ui: read_only`` hides and refuses (403) every action; ``off``: 404.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import importlib.resources
import itertools
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import orjson
from aiohttp import web

from jobqd import ops, schedules
from jobqd.config import QUEUE_RE
from jobqd.errors import JobNotFound
from jobqd.heartbeat import RedisHeartbeats
from jobqd.ids import queue_of
from jobqd.jobs import BadJob
from jobqd.runtime import Runtime

PREFIX = "/ui"
SESSION_COOKIE = "jobqd_session"
CSRF_COOKIE = "jobqd_csrf"
SAMPLE_EVERY_S = 2.0  # the overview polls every 2 s: one sample per poll, at most
HISTORY_S = 3600.0
RATE_WINDOW_S = 300.0  # rates in/out: over the last five minutes of history
PAGE_SIZE = 50
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_STATIC = {"ui.js": "text/javascript", "ui.css": "text/css"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def esc(v: Any) -> str:
    """Text for HTML (element content and quoted attributes)."""
    return html.escape("" if v is None else str(v), quote=True)


def utc(ts: float | None) -> str:
    """A timestamp in UTC, marked up so ui.js can add the viewer's local time."""
    if ts is None:
        return "—"
    text = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f'<time data-ts="{ts:.3f}">{text}</time>'


def age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


@dataclass
class Sample:
    t: float
    depth: dict[str, int]
    ins: dict[str, int]  # queue -> its enqueue counters, summed over tasks
    outs: dict[str, int]  # queue -> its settled counter

    @property
    def enqueued(self) -> int:
        return sum(self.ins.values())

    @property
    def done(self) -> int:
        return sum(self.outs.values())


@dataclass
class UiState:
    rt: Runtime
    token: bytes | None
    runner: ops.AsyncRunner
    history: deque[Sample] = field(
        default_factory=lambda: deque(maxlen=int(HISTORY_S / SAMPLE_EVERY_S) + 1))

    @property
    def prefix(self) -> str:
        return self.rt.config.redis.prefix

    def session_value(self) -> str:
        assert self.token is not None
        return hmac.new(self.token, b"jobqd-ui-session", hashlib.sha256).hexdigest()

    def record(self, stats: list[ops.QueueStats], now: float) -> None:
        """Add a sample when the last one is SAMPLE_EVERY_S old (called when polled)."""
        if self.history and now - self.history[-1].t < SAMPLE_EVERY_S:
            return
        self.history.append(Sample(
            t=now, depth={s.name: s.depth for s in stats},
            ins={s.name: sum(s.enqueued.values()) for s in stats},
            outs={s.name: s.done for s in stats}))

    def rates(self, stats: list[ops.QueueStats],
              now: float) -> dict[str, tuple[float | None, float | None]]:
        """queue -> (in/s, out/s) over up to RATE_WINDOW_S of history (None: too little)."""
        old = next((h for h in self.history if now - h.t <= RATE_WINDOW_S), None)
        out: dict[str, tuple[float | None, float | None]] = {}
        for s in stats:
            if old is None or now - old.t < 1.0 or s.name not in old.ins:
                out[s.name] = (None, None)
            else:
                dt = now - old.t
                out[s.name] = (max(0, sum(s.enqueued.values()) - old.ins[s.name]) / dt,
                               max(0, s.done - old.outs[s.name]) / dt)
        return out


UI = web.AppKey("jobqd_ui_state", UiState)
NEW_CSRF = web.RequestKey("jobqd_new_csrf", str)  # a CSRF cookie to set on the answer
LOGOUT = web.RequestKey("jobqd_logout", bool)


# ---------------------------------------------------------------- auth, csrf, modes


def _mode(request: web.Request) -> str:
    return request.app[UI].rt.config.http.ui


def _bearer_ok(request: web.Request, token: bytes) -> bool:
    scheme, _, cred = request.headers.get("Authorization", "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        cred.strip().encode("utf-8", "surrogatepass"), token)


def _authed(request: web.Request) -> bool:
    st = request.app[UI]
    if st.token is None or _bearer_ok(request, st.token):
        return True
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return hmac.compare_digest(cookie.encode(), st.session_value().encode())


def _csrf(request: web.Request) -> str:
    """This browser's CSRF token (the cookie's value; a new one if it has none)."""
    value = request.cookies.get(CSRF_COOKIE) or request.get(NEW_CSRF)
    if not value:
        value = request[NEW_CSRF] = secrets.token_urlsafe(24)
    return str(value)


def _headers(resp: web.StreamResponse) -> None:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Cache-Control"] = "no-store"


def _finish(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    _headers(resp)
    new = request.get(NEW_CSRF)
    if new:
        resp.set_cookie(CSRF_COOKIE, new, path=PREFIX, httponly=True, samesite="Strict")
    return resp


def _error(status: int, message: str) -> web.Response:
    resp = web.Response(status=status, content_type="text/html",
                        text=f"<!doctype html><title>{status}</title><p>{esc(message)}</p>")
    _headers(resp)
    return resp


def page(view: Handler) -> Handler:
    """A GET page: 404 when the dashboard is off; the login form when not signed in."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        if _mode(request) == "off":
            return _error(404, "not found")
        if not _authed(request):
            if request.path.startswith(PREFIX + "/api/"):
                return _error(401, "sign in first")
            raise web.HTTPSeeOther(PREFIX + "/login?next=" + quote(request.path_qs))
        return _finish(request, await view(request))
    return wrapped


def action(view: Callable[[web.Request, dict[str, str]], Awaitable[str]], *,
           read_only_ok: bool = False) -> Handler:
    """A POST action: refused in read_only (403, unless `read_only_ok`: signing out),
    without auth (401) or without the CSRF token (403); on success, redirects (303)
    to the page `view` returns."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        mode = _mode(request)
        if mode == "off":
            return _error(404, "not found")
        if not _authed(request):
            return _error(401, "sign in first")
        if mode == "read_only" and not read_only_ok:
            return _error(403, "the dashboard is read-only (http.ui: read_only)")
        form = {k: str(v) for k, v in (await request.post()).items()}
        st = request.app[UI]
        if not (st.token is not None and _bearer_ok(request, st.token)):
            cookie = request.cookies.get(CSRF_COOKIE, "")
            given = request.headers.get("X-CSRF-Token") or form.get("csrf", "")
            if not cookie or not hmac.compare_digest(cookie.encode(), given.encode()):
                return _error(403, "missing or wrong CSRF token: reload the page and retry")
        target = await view(request, form)
        resp = web.HTTPSeeOther(target)
        _headers(resp)
        if request.get(LOGOUT):
            resp.del_cookie(SESSION_COOKIE, path=PREFIX)
        raise resp
    return wrapped


# ---------------------------------------------------------------- layout

NAV = [("overview", "Overview", ""), ("workers", "Workers", "/workers"),
       ("dlq", "Dead letters", "/dlq"), ("schedules", "Schedules", "/schedules"),
       ("weights", "Weights", "/weights")]


def _layout(request: web.Request, name: str, title: str, body: str,
            flash: str | None = None) -> web.Response:
    links = "".join(
        f'<a href="{PREFIX}{path or "/"}"{" class=on" if key == name else ""}>{label}</a>'
        for key, label, path in NAV)
    mode = _mode(request)
    ro = '<span class="badge">read-only</span>' if mode == "read_only" else ""
    find = (f'<form class="find" method="get" action="{PREFIX}/job">'
            f'<input name="id" placeholder="find job by id" aria-label="job id">'
            f"<button>Find</button></form>")
    logout = ""
    if request.app[UI].token is not None and request.cookies.get(SESSION_COOKIE):
        logout = (f'<form method="post" action="{PREFIX}/logout" class="inline">'
                  f"{_csrf_field(request)}<button>Sign out</button></form>")
    msg = f'<p class="flash">{esc(flash)}</p>' if flash else ""
    text = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width">'
            f"<title>{esc(title)} · jobqd</title>"
            f'<link rel="stylesheet" href="{PREFIX}/static/ui.css">'
            f'<script src="{PREFIX}/static/ui.js" defer></script></head>'
            f'<body data-page="{name}" data-csrf="{esc(_csrf(request))}">'
            f'<header><b>jobqd</b><nav>{links}</nav>{ro}{find}{logout}</header>'
            f"<main><h1>{esc(title)}</h1>{msg}{body}</main></body></html>")
    return web.Response(text=text, content_type="text/html")


def _csrf_field(request: web.Request) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(_csrf(request))}">'


def _can_act(request: web.Request) -> bool:
    return _mode(request) == "on"


def _button(request: web.Request, url: str, label: str, *, confirm: str | None = None,
            extra: str = "") -> str:
    if not _can_act(request):
        return ""
    data = f' data-confirm="{esc(confirm)}"' if confirm else ""
    return (f'<form method="post" action="{esc(url)}" class="inline"{data}>'
            f"{_csrf_field(request)}{extra}<button>{esc(label)}</button></form>")


def _table(head: Iterable[str], rows: Iterable[str], cls: str = "") -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join(rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _q(queue: str) -> str:
    return f'<a href="{PREFIX}/queues/{quote(queue)}">{esc(queue)}</a>'


def _job(job_id: str | None) -> str:
    if not job_id:
        return "—"
    return f'<a href="{PREFIX}/jobs/{quote(job_id, safe="")}">{esc(job_id)}</a>'


def _show_args(request: web.Request) -> bool:
    cfg = request.app[UI].rt.config
    return cfg.log.payloads or cfg.http.ui_payloads


def _json(v: Any) -> str:
    return esc(orjson.dumps(v, option=orjson.OPT_INDENT_2).decode())


# ---------------------------------------------------------------- overview


async def _overview_data(st: UiState) -> dict[str, Any]:
    stats = await st.runner.run(ops.queue_stats(st.prefix))
    now = time.time()
    st.record(stats, now)
    rates = st.rates(stats, now)
    workers = await RedisHeartbeats(st.rt.redis, st.prefix).workers()
    timeout = st.rt.config.heartbeat.timeout_s
    live = sum(1 for w in workers if w.get("heartbeat_age_s") is not None
               and float(str(w["heartbeat_age_s"])) <= timeout)
    yaml_w = {n: q.weight for n, q in st.rt.config.queues.items()}
    queues = []
    for s in stats:
        rin, rout = rates[s.name]
        queues.append({**s.to_dict(), "yaml_weight": yaml_w.get(s.name),
                       "rate_in": rin, "rate_out": rout})
    hist = list(st.history)
    if hist and hist[-1].t < now:  # the current reading ends the lines (not stored)
        hist.append(Sample(t=now, depth={s.name: s.depth for s in stats},
                           ins={s.name: sum(s.enqueued.values()) for s in stats},
                           outs={s.name: s.done for s in stats}))
    t0 = hist[0].t if hist else now
    points = [{"t": h.t - t0, "depth": h.depth} for h in hist]
    thr = []
    for a, b in itertools.pairwise(hist):
        dt = b.t - a.t
        thr.append({"t": b.t - t0, "in": max(0, b.enqueued - a.enqueued) / dt,
                    "out": max(0, b.done - a.done) / dt})
    return {"now": now, "queues": queues, "dead": sum(s.dead for s in stats),
            "workers_live": live, "workers": len(workers),
            "history": {"span_s": (hist[-1].t - t0) if hist else 0.0, "depth": points,
                        "throughput": thr}}


def _rate(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}/s"


async def overview(request: web.Request) -> web.Response:
    st = request.app[UI]
    data = await _overview_data(st)
    rows = []
    for q in data["queues"]:
        name = q["name"]
        act = (_button(request, f"{PREFIX}/queues/{quote(name)}/"
                       f"{'resume' if q['paused'] else 'pause'}",
                       "Resume" if q["paused"] else "Pause"))
        rows.append(
            f'<tr data-q="{esc(name)}"><td>{_q(name)}</td>'
            f'<td data-k="waiting">{q["waiting"]}</td>'
            f'<td data-k="scheduled">{q["scheduled"]}</td>'
            f'<td data-k="in_flight">{q["in_flight"]}</td>'
            f'<td data-k="rate_in">{_rate(q["rate_in"])}</td>'
            f'<td data-k="rate_out">{_rate(q["rate_out"])}</td>'
            f'<td data-k="lag_s">{age(q["lag_s"])}</td>'
            f'<td>{esc(q["weight"])} / {esc(q["yaml_weight"])}</td>'
            f'<td data-k="accepting">{"accepting" if q["accepting"] else "REFUSING"}</td>'
            f'<td data-k="paused">{"paused" if q["paused"] else "running"}</td>'
            f'<td><a data-k="dead" href="{PREFIX}/dlq?queue={quote(name)}">{q["dead"]}</a></td>'
            f"<td>{act}</td></tr>")
    table = _table(["Queue", "Queued", "Scheduled", "Running", "In", "Out", "Oldest",
                    "Weight (runtime / YAML)", "Enqueues", "State", "Dead", ""], rows,
                   "queues")
    body = (f'<p class="summary">Dead letters: <b id="dead">{data["dead"]}</b> · '
            f'Live daemons: <b id="live">{data["workers_live"]}</b> '
            f'(of <span id="workers">{data["workers"]}</span> registered)</p>{table}'
            f'<section class="charts"><figure><figcaption>Throughput (jobs/s: in, out)'
            f'</figcaption><svg id="chart-throughput" viewBox="0 0 600 160"></svg></figure>'
            f'<figure><figcaption>Depth per queue</figcaption>'
            f'<svg id="chart-depth" viewBox="0 0 600 160"></svg></figure></section>')
    return _layout(request, "overview", "Overview", body)


async def api_overview(request: web.Request) -> web.Response:
    data = await _overview_data(request.app[UI])
    return web.Response(body=orjson.dumps(data), content_type="application/json")


# ---------------------------------------------------------------- queue page


def _queue_name(request: web.Request) -> str:
    queue = request.match_info["queue"]
    if not QUEUE_RE.fullmatch(queue):
        raise web.HTTPNotFound()
    return queue


async def queue_page(request: web.Request) -> web.Response:
    st = request.app[UI]
    queue = _queue_name(request)
    if queue not in await st.runner.run(ops.known_queues(st.prefix)):
        return _error(404, f"unknown queue {queue!r}")
    qs = request.query
    where = qs.get("where", "stream")
    if where not in ("stream", "scheduled", "running"):
        where = "stream"
    newest = qs.get("order") == "newest"
    task = qs.get("task") or None
    try:
        jp = await st.runner.run(ops.queue_jobs(
            st.prefix, queue, where, newest_first=newest, after=qs.get("after") or None,
            count=PAGE_SIZE, task=task))
    except Exception as e:  # a hand-edited cursor Redis refuses
        if "ERR" not in str(e):
            raise
        return _error(400, "bad cursor")
    [stats] = await st.runner.run(ops.queue_stats(st.prefix, [queue]))
    tabs = " ".join(
        f'<a href="?{urlencode({"where": w, "order": qs.get("order", "oldest")})}"'
        f'{" class=on" if w == where else ""}>{label}</a>'
        for w, label in (("stream", f"In the stream ({stats.waiting + stats.in_flight})"),
                         ("scheduled", f"Scheduled ({stats.scheduled})"),
                         ("running", f"Running ({stats.in_flight})")))
    order_opts = "".join(f'<option value="{o}"{" selected" if (o == "newest") == newest else ""}'
                         f">{o} first</option>" for o in ("oldest", "newest"))
    filt = (f'<form method="get" class="filter"><input type="hidden" name="where" '
            f'value="{esc(where)}"><select name="order">{order_opts}</select>'
            f'<input name="task" value="{esc(task or "")}" placeholder="task" '
            f'aria-label="filter by task"><button>Filter</button></form>')
    rows = []
    for r in jp.rows:
        pos = utc(int(r.position) / 1000) if where == "scheduled" else esc(r.position)
        cancel = _button(request, f"{PREFIX}/jobs/{quote(r.id, safe='')}/cancel", "Cancel")
        rows.append(f"<tr><td>{_job(r.id)}</td><td>{esc(r.task)}</td>"
                    f"<td>{utc(r.enqueued_at)}</td><td>{r.attempts}</td><td>{pos}</td>"
                    f"<td>{esc(r.worker or '')}</td><td>{age(r.idle_s) if r.worker else ''}"
                    f"</td><td>{cancel}</td></tr>")
    head = ["Job", "Task", "Enqueued", "Attempts",
            "Due" if where == "scheduled" else "Entry", "Worker", "Running for", ""]
    nxt = ""
    if jp.next is not None:
        params = {"where": where, "order": "newest" if newest else "oldest",
                  "after": jp.next, **({"task": task} if task else {})}
        nxt = f'<a class="next" href="?{esc(urlencode(params))}">Next page →</a>'
    pause = _button(request, f"{PREFIX}/queues/{quote(queue)}/"
                    f"{'resume' if stats.paused else 'pause'}",
                    "Resume" if stats.paused else "Pause",
                    extra='<input type="hidden" name="back" value="queue">')
    body = (f'<p>{"paused" if stats.paused else "running"} · '
            f'{"accepting" if stats.accepting else "REFUSING enqueues"} · '
            f'dead letters: <a href="{PREFIX}/dlq?queue={quote(queue)}">{stats.dead}</a> '
            f'{pause}</p><nav class="tabs">{tabs}</nav>{filt}'
            f'{_table(head, rows, "jobs")}<p class="muted">{len(jp.rows)} shown '
            f'(read {jp.scanned} entries)</p>{nxt}')
    return _layout(request, "queue", f"Queue {queue}", body)


# ---------------------------------------------------------------- job page


async def find_job(request: web.Request) -> web.StreamResponse:
    job_id = request.query.get("id", "").strip()
    raise web.HTTPSeeOther(f"{PREFIX}/jobs/{quote(job_id, safe='')}" if job_id else PREFIX + "/")


async def job_page(request: web.Request) -> web.Response:
    st = request.app[UI]
    job_id = request.match_info["id"]
    q = queue_of(job_id)
    if q is None or not QUEUE_RE.fullmatch(q):
        return _error(404, f"no job {job_id!r}")
    try:
        info = await st.runner.run(ops.status(st.prefix, job_id))
    except JobNotFound:
        found = await st.rt.events.lookup(job_id)
        if found is None:
            return _error(404, f"no job {job_id!r}")
        info = found
    rows = [("Status", f'<b class="status {esc(info.status)}">{esc(info.status)}</b>'
             + (" (cancel requested)" if info.cancel_requested else "")),
            ("Queue", _q(info.queue) if info.queue else "—"), ("Task", esc(info.task)),
            ("Attempts", esc(info.attempts)), ("Lost deliveries", esc(info.lost)),
            ("Enqueued", utc(info.enqueued_at)), ("Scheduled for", utc(info.scheduled_for)),
            ("Started", utc(info.started_at)), ("Finished", utc(info.finished_at)),
            ("Worker", esc(info.worker or "—"))]
    if info.reason:
        rows.append(("Reason", esc(info.reason)))
    if info.progress:
        p = info.progress
        frac = float(p.get("fraction") or 0)
        rows.append(("Progress", f'<progress max="1" value="{frac:.3f}"></progress> '
                     f"{frac * 100:.0f}% {esc(p.get('message') or '')}"))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    body = f"<dl>{dl}</dl>"
    if info.args is not None:
        if _show_args(request):
            body += f"<h2>Args</h2><pre class=args>{_json(info.args)}</pre>"
        else:
            body += ('<p class="muted">Args hidden (set log.payloads or http.ui_payloads '
                     "to show them).</p>")
    if info.result is not None:
        body += f"<h2>Result</h2><pre>{_json(info.result)}</pre>"
    if info.error:
        body += f'<h2>Error</h2><pre class="error">{esc(info.error)}</pre>'
    if info.traceback:
        body += f'<h2>Traceback</h2><pre class="traceback">{esc(info.traceback)}</pre>'
    acts = ""
    if info.status in ("queued", "scheduled", "running"):
        acts += _button(request, f"{PREFIX}/jobs/{quote(job_id, safe='')}/cancel",
                        "Cancel job")
    if info.status == "dead":
        acts += _button(request, f"{PREFIX}/dlq/replay", "Replay",
                        extra=f'<input type="hidden" name="ref" value="{esc(job_id)}">')
    flash = request.query.get("msg")
    return _layout(request, "job", f"Job {job_id}", body + f"<p>{acts}</p>", flash=flash)


async def job_cancel(request: web.Request, form: dict[str, str]) -> str:
    st = request.app[UI]
    job_id = request.match_info["id"]
    url = f"{PREFIX}/jobs/{quote(job_id, safe='')}"
    try:
        [res] = await st.runner.run(ops.cancel(st.prefix, [job_id],
                                               int(st.rt.config.results.ttl_s * 1000)))
    except JobNotFound:
        return url + "?msg=" + quote("no such job")
    return url + "?msg=" + quote(f"cancel: {res.outcome} ({res.status})")


async def queue_pause(request: web.Request, form: dict[str, str]) -> str:
    return await _set_paused(request, form, True)


async def queue_resume(request: web.Request, form: dict[str, str]) -> str:
    return await _set_paused(request, form, False)


async def _set_paused(request: web.Request, form: dict[str, str], paused: bool) -> str:
    st = request.app[UI]
    queue = _queue_name(request)
    try:
        await st.runner.run(ops.set_paused(st.prefix, queue, paused))
    except ops.UnknownQueue:
        raise web.HTTPNotFound() from None
    # back to the queue's page when asked from there (no Referer: no-referrer policy)
    return f"{PREFIX}/queues/{quote(queue)}" if form.get("back") == "queue" else PREFIX + "/"


# ---------------------------------------------------------------- workers, schedules


async def workers_page(request: web.Request) -> web.Response:
    st = request.app[UI]
    workers = await RedisHeartbeats(st.rt.redis, st.prefix).workers()
    timeout = st.rt.config.heartbeat.timeout_s
    rows = []
    for w in sorted(workers, key=lambda w: str(w.get("name"))):
        hb = w.get("heartbeat_age_s")
        stale = hb is None or float(str(hb)) > timeout
        started = w.get("started")
        up = time.time() - float(str(started)) if isinstance(started, int | float) else None
        rows.append(
            f'<tr class="{"stale" if stale else ""}"><td>{esc(w.get("name"))}</td>'
            f'<td>{esc(w.get("host"))}</td><td>{esc(w.get("pid"))}</td>'
            f'<td>{esc(w.get("version"))}</td><td>{age(up)}</td>'
            f'<td>{esc(w.get("running", "?"))} / {esc(w.get("capacity", "?"))}</td>'
            f'<td>{esc(", ".join(map(str, w.get("queues") or [])))}</td>'  # type: ignore[call-overload]
            f'<td>{age(float(str(hb)) if hb is not None else None)}'
            f'{" <b>STALE</b>" if stale else ""}</td></tr>')
    body = _table(["Consumer", "Host", "PID", "Version", "Uptime", "Busy / capacity",
                   "Queues", "Heartbeat age"], rows, "workers")
    if not rows:
        body = "<p>No daemon is registered.</p>"
    return _layout(request, "workers", "Workers", body)


async def schedules_page(request: web.Request) -> web.Response:
    rt = request.app[UI].rt
    items = await schedules.describe(rt.redis, rt.config)
    rows = [f'<tr><td>{esc(s["name"])}</td><td>{esc(s["task"])}</td><td>{_q(s["queue"])}</td>'
            f'<td>{esc(s["expression"])}</td><td>{"yes" if s["enabled"] else "no"}</td>'
            f'<td>{utc(s["next_run"])}</td><td>{utc(s["last_run"])}</td>'
            f'<td>{_job(s["last_job_id"])} {esc(s["last_job_status"] or "")}</td></tr>'
            for s in items]
    body = (_table(["Name", "Task", "Queue", "When", "Enabled", "Next run", "Last run",
                    "Last job"], rows, "schedules")
            if rows else "<p>No schedules are configured.</p>")
    return _layout(request, "schedules", "Schedules", body)


# ---------------------------------------------------------------- weights


async def weights_page(request: web.Request) -> web.Response:
    st = request.app[UI]
    stats = await st.runner.run(ops.queue_stats(st.prefix))
    yaml_w = {n: q.weight for n, q in st.rt.config.queues.items()}
    can = _can_act(request)
    rows = []
    for s in stats:
        cell = (f'<input type="number" min="0" step="1" name="w:{esc(s.name)}" '
                f'value="{esc(s.weight if s.weight is not None else "")}" '
                f'aria-label="weight of {esc(s.name)}">' if can else esc(s.weight))
        rows.append(f"<tr><td>{_q(s.name)}</td><td>{cell}</td>"
                    f"<td>{esc(yaml_w.get(s.name, '—'))}</td></tr>")
    table = _table(["Queue", "Runtime weight", "YAML weight"], rows, "weights")
    body = table
    if can:
        body = (f'<form method="post" action="{PREFIX}/weights">{_csrf_field(request)}'
                f"{table}<button>Save weights</button></form>")
    return _layout(request, "weights", "Weights", body, flash=request.query.get("msg"))


async def weights_save(request: web.Request, form: dict[str, str]) -> str:
    st = request.app[UI]
    changes: dict[str, int] = {}
    for k, v in form.items():
        if k.startswith("w:") and v.strip():
            try:
                changes[k[2:]] = int(v)
            except ValueError:
                return f"{PREFIX}/weights?msg=" + quote(f"not an integer: {v[:40]}")
    try:
        await st.runner.run(ops.weights_set(st.prefix, changes, st.rt.config.queues))
    except (ops.UnknownQueue, ValueError) as e:
        return f"{PREFIX}/weights?msg=" + quote(str(e)[:200])
    return f"{PREFIX}/weights?msg=" + quote("weights saved")


# ---------------------------------------------------------------- dead letters


async def dlq_page(request: web.Request) -> web.Response:
    st = request.app[UI]
    known = await st.runner.run(ops.known_queues(st.prefix))
    queue = request.query.get("queue") or None
    if queue is not None and queue not in known:
        return _error(404, f"unknown queue {queue!r}")
    totals = await st.runner.run(ops.dlq_totals(st.prefix, known))
    after = request.query.get("after") or None
    entries: list[ops.DeadJob] = []
    for q in [queue] if queue else known:
        if totals.get(q):
            try:
                entries += await st.runner.run(ops.dlq_page(
                    st.prefix, q, after if queue else None, PAGE_SIZE))
            except Exception as exc:
                if "ERR" not in str(exc):
                    raise
                return _error(400, "bad cursor")
    entries = entries[:PAGE_SIZE]
    can = _can_act(request)
    tabs = " ".join(
        f'<a href="{PREFIX}/dlq?queue={quote(q)}"{" class=on" if q == queue else ""}>'
        f"{esc(q)} ({totals.get(q, 0)})</a>" for q in known)
    rows = []
    for d in entries:
        ent = d.to_dict()
        box = (f'<input type="checkbox" name="ref" value="{esc(d.ref)}" '
               f'aria-label="select {esc(d.ref)}">' if can else "")
        err = str(ent["error"] or "")
        rows.append(f'<tr><td>{box}</td><td><a href="{PREFIX}/dlq/show?ref='
                    f'{quote(d.ref, safe="")}">{esc(d.ref)}</a></td><td>{esc(ent["task"])}</td>'
                    f"<td>{esc(d.queue)}</td><td>{esc(ent['reason'])}</td>"
                    f'<td class="err">{esc(err[:200])}</td><td>{utc(ent["died_at"])}</td></tr>')
    table = _table(["", "Job", "Task", "Queue", "Reason", "Error", "Died"], rows, "dlq")
    body = f'<nav class="tabs">{tabs}</nav>'
    if can and rows:
        n = len(rows)
        body += (f'<form method="post" action="{PREFIX}/dlq/bulk">{_csrf_field(request)}'
                 f"{table}<p>"
                 f'<button name="do" value="replay" data-confirm="Replay the selected '
                 f'dead jobs?">Replay selected</button> '
                 f'<button name="do" value="purge" data-confirm="Delete the selected dead '
                 f'jobs for good?">Purge selected</button> <span class="muted">{n} shown'
                 f"</span></p></form>")
        if queue:
            body += _button(request, f"{PREFIX}/dlq/replay-all", f"Replay all of {queue}",
                            confirm=f"Replay every dead job of {queue} "
                                    f"({totals.get(queue, 0)})?",
                            extra=f'<input type="hidden" name="queue" value="{esc(queue)}">')
    elif rows:
        body += table
    else:
        body += "<p>No dead letters.</p>"
    if queue and len(entries) == PAGE_SIZE:
        body += (f'<a class="next" href="{PREFIX}/dlq?'
                 f'{esc(urlencode({"queue": queue, "after": entries[-1].entry_id}))}">'
                 "Next page →</a>")
    return _layout(request, "dlq", "Dead letters", body, flash=request.query.get("msg"))


async def dlq_show(request: web.Request) -> web.Response:
    st = request.app[UI]
    ref = request.query.get("ref", "")
    try:
        d = await st.runner.run(ops.dlq_show(st.prefix, ref))
    except (JobNotFound, ValueError):
        return _error(404, f"no dead-letter entry {ref!r}")
    except Exception as exc:
        if "ERR" not in str(exc):
            raise
        return _error(404, f"no dead-letter entry {ref!r}")
    ent = d.to_dict()
    rows = [("Job", _job(d.job_id) if d.job_id else esc(d.ref)), ("Task", esc(ent["task"])),
            ("Queue", _q(d.queue)), ("Reason", esc(ent["reason"])),
            ("Attempts", esc(ent["attempts"])), ("Lost deliveries", esc(ent["lost"])),
            ("Enqueued", utc(ent["enqueued_at"])), ("Died", utc(ent["died_at"]))]
    body = "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"
    if ent["args"] is not None and _show_args(request):
        body += f"<h2>Args</h2><pre class=args>{_json(ent['args'])}</pre>"
    if "raw" in ent:
        body += f"<h2>Raw entry</h2><pre>{esc(ent['raw'])}</pre>"
    body += f'<h2>Error</h2><pre class="error">{esc(ent["error"])}</pre>'
    if ent["traceback"]:
        body += f'<h2>Traceback</h2><pre class="traceback">{esc(ent["traceback"])}</pre>'
    hidden = f'<input type="hidden" name="ref" value="{esc(d.ref)}">'
    body += "<p>" + _button(request, f"{PREFIX}/dlq/replay", "Replay", extra=hidden)
    body += _button(request, f"{PREFIX}/dlq/bulk", "Delete", confirm="Delete this dead job?",
                    extra=hidden + '<input type="hidden" name="do" value="purge">') + "</p>"
    return _layout(request, "dlq", f"Dead letter {d.ref}", body)


async def dlq_replay(request: web.Request, form: dict[str, str]) -> str:
    st = request.app[UI]
    ref = form.get("ref", "")
    try:
        job_id = await st.runner.run(ops.dlq_replay(st.prefix, ref))
    except (JobNotFound, BadJob) as e:
        return f"{PREFIX}/dlq?msg=" + quote(f"not replayed: {e}"[:200])
    return f"{PREFIX}/jobs/{quote(job_id, safe='')}?msg=" + quote("replayed")


async def dlq_bulk(request: web.Request, form: dict[str, str]) -> str:
    st = request.app[UI]
    refs = [str(v) for v in (await request.post()).getall("ref", [])]
    what = form.get("do")
    done = failed = 0
    for ref in refs:
        try:
            if what == "replay":
                await st.runner.run(ops.dlq_replay(st.prefix, ref))
            elif what == "purge":
                await st.runner.run(ops.dlq_delete(st.prefix, ref))
            else:
                return f"{PREFIX}/dlq?msg=" + quote("unknown action")
            done += 1
        except (JobNotFound, BadJob):
            failed += 1
    verb = "replayed" if what == "replay" else "purged"
    return f"{PREFIX}/dlq?msg=" + quote(f"{verb} {done}" + (f", {failed} failed" if failed
                                                             else ""))


async def dlq_replay_all(request: web.Request, form: dict[str, str]) -> str:
    st = request.app[UI]
    queue = form.get("queue", "")
    if queue not in await st.runner.run(ops.known_queues(st.prefix)):
        return f"{PREFIX}/dlq?msg=" + quote("unknown queue")
    replayed, skipped = await st.runner.run(ops.dlq_replay_all(st.prefix, queue))
    return f"{PREFIX}/dlq?queue={quote(queue)}&msg=" + quote(
        f"replayed {replayed}" + (f", skipped {skipped} invalid" if skipped else ""))


# ---------------------------------------------------------------- login, static


async def login_page(request: web.Request) -> web.StreamResponse:
    if _mode(request) == "off":
        return _error(404, "not found")
    nxt = request.query.get("next", PREFIX + "/")
    bad = '<p class="flash">Wrong token.</p>' if request.query.get("bad") else ""
    body = (f'{bad}<form method="post" action="{PREFIX}/login" class="login">'
            f"{_csrf_field(request)}"
            f'<input type="hidden" name="next" value="{esc(nxt)}">'
            f'<label>Token <input type="password" name="token" autocomplete="current-password"'
            f' autofocus></label> <button>Sign in</button></form>')
    return _finish(request, _layout(request, "login", "Sign in", body))


async def login(request: web.Request) -> web.StreamResponse:
    st = request.app[UI]
    if _mode(request) == "off":
        return _error(404, "not found")
    form = await request.post()
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not hmac.compare_digest(cookie.encode(),
                                             str(form.get("csrf", "")).encode()):
        return _error(403, "missing or wrong CSRF token: reload the page and retry")
    nxt = str(form.get("next", PREFIX + "/"))
    if not nxt.startswith(PREFIX + "/") or nxt.startswith("//"):
        nxt = PREFIX + "/"
    if st.token is None:
        raise web.HTTPSeeOther(nxt)
    given = str(form.get("token", "")).strip().encode("utf-8", "surrogatepass")
    if not hmac.compare_digest(given, st.token):
        raise web.HTTPSeeOther(PREFIX + "/login?bad=1&next=" + quote(nxt))
    resp = web.HTTPSeeOther(nxt)
    resp.set_cookie(SESSION_COOKIE, st.session_value(), path=PREFIX, httponly=True,
                    samesite="Strict")
    raise resp


async def logout(request: web.Request, form: dict[str, str]) -> str:
    request[LOGOUT] = True
    return PREFIX + "/login"


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in _STATIC or _mode(request) == "off":
        return _error(404, "not found")
    data = importlib.resources.files("jobqd").joinpath("ui_static", name).read_bytes()
    resp = web.Response(body=data, content_type=_STATIC[name])
    _headers(resp)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


async def root_redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound(PREFIX + "/")


def owns(path: str) -> bool:
    """The dashboard checks its own auth (cookie or bearer) on these paths."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def setup(app: web.Application, rt: Runtime, token: bytes | None) -> None:
    """Register the dashboard's routes on the daemon's HTTP app."""
    app[UI] = UiState(rt=rt, token=token, runner=ops.AsyncRunner(rt.redis))
    add_get, add_post = app.router.add_get, app.router.add_post
    add_get(PREFIX, root_redirect)
    add_get(PREFIX + "/", page(overview))
    add_get(PREFIX + "/api/overview", page(api_overview))
    add_get(PREFIX + "/queues/{queue}", page(queue_page))
    add_post(PREFIX + "/queues/{queue}/pause", action(queue_pause))
    add_post(PREFIX + "/queues/{queue}/resume", action(queue_resume))
    add_get(PREFIX + "/job", page(find_job))
    add_get(PREFIX + "/jobs/{id}", page(job_page))
    add_post(PREFIX + "/jobs/{id}/cancel", action(job_cancel))
    add_get(PREFIX + "/workers", page(workers_page))
    add_get(PREFIX + "/schedules", page(schedules_page))
    add_get(PREFIX + "/weights", page(weights_page))
    add_post(PREFIX + "/weights", action(weights_save))
    add_get(PREFIX + "/dlq", page(dlq_page))
    add_get(PREFIX + "/dlq/show", page(dlq_show))
    add_post(PREFIX + "/dlq/replay", action(dlq_replay))
    add_post(PREFIX + "/dlq/bulk", action(dlq_bulk))
    add_post(PREFIX + "/dlq/replay-all", action(dlq_replay_all))
    add_get(PREFIX + "/login", login_page)
    add_post(PREFIX + "/login", login)
    add_post(PREFIX + "/logout", action(logout, read_only_ok=True))
    add_get(PREFIX + "/static/{name}", static)
