"""The API under load and hostile input (issue 14, findings 3 and 6): log followers, slow users'
requests and a busy user cannot starve the agents' heartbeats or other users; per-user limits on
streams and request rate; a body size limit; every integer bounded so a bad one is a 422.

The load tests run the app in a real uvicorn server on a thread (the in-process test client runs
a streaming answer to its end before it returns); the rest use the in-process client.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from _waits import wait_until
from fastapi import Depends
from fastapi.testclient import TestClient

from haiplatform.api import bootstrap, create_app, principal
from haiplatform.config import HaiConfig
from network import load_cluster

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local.toml"
ADMIN, SERVICE = "admin-tok", "cluster-secret"
JOB = {"name": "train", "command": ["python", "-c", "print(1)"], "nodes": 1}


def _auth(tok: str) -> dict:
    return {"Authorization": f"Bearer {tok}"}


def _app(db, tmp_path, **limits):
    cfg = HaiConfig(state_dir=tmp_path / "state", admin_token=ADMIN, cluster_secret=SERVICE, **limits)
    cfg.state_dir.mkdir(exist_ok=True)
    bootstrap(cfg, db)
    return create_app(load_cluster(LOCAL_CLUSTER), cfg, db)


@pytest.fixture
def api(db, tmp_path):
    """Factory: an in-process client of the API with the given limits (admin token by default)."""
    clients = []

    def make(**limits) -> TestClient:
        c = TestClient(_app(db, tmp_path, **limits)).__enter__()
        c.headers["Authorization"] = f"Bearer {ADMIN}"
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


class Served:
    """The app in a uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    access_log=False, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="api-under-test", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the API server did not start within 20 s"
            assert self.thread.is_alive(), "the API server thread died"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10.0, headers=_auth(ADMIN))

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(15)

    def send_raw(self, path: str, token: str) -> socket.socket:
        """A GET sent on a new connection whose answer is left unread (a follower, a slow client)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        return s


def status_of(s: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """The status code of the answer on ``s`` (and what came with it), within ``timeout``."""
    s.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        return 0, data
    line = data.split(b"\r\n", 1)[0].split()
    return (int(line[1]) if len(line) > 1 else 0), data


@pytest.fixture
def served(db, tmp_path):
    started: list[Served] = []
    sockets: list[socket.socket] = []

    def start(app=None, **limits) -> Served:
        srv = Served(app if app is not None else _app(db, tmp_path, **limits))
        started.append(srv)
        return srv

    start.sockets = sockets
    yield start
    for s in sockets:
        s.close()
    for srv in started:
        srv.stop()


def _agent_beats(srv: Served) -> None:
    """An agent's heartbeat path answers, quickly: register, sync, report (as the agent's client
    would, with the heartbeat's own timeout, well under the 10 s heartbeat_timeout)."""
    with httpx.Client(base_url=srv.url, headers=_auth(SERVICE), timeout=5.0) as agent:
        r = agent.post("/v1/agent/register", json={"node": "n0", "epoch": "e1", "cpus": 2})
        assert r.status_code == 200, r.text
        for _ in range(3):
            r = agent.get("/v1/agent/sync", params={"node": "n0", "epoch": "e1", "timeout": 0})
            assert r.status_code == 200, r.text
        r = agent.post("/v1/agent/report", json={"node": "n0", "epoch": "e1", "ranks": []})
        assert r.status_code == 200, r.text


# -- finding 3: log followers ------------------------------------------------------------------------

def test_many_log_followers_of_queued_jobs_starve_nothing_and_end_with_their_clients(served):
    """42 followers (6 users x 7, within the per-user limit) of queued jobs' logs: /healthz, another
    user's calls and an agent's heartbeats still answer; when the followers hang up, their streams
    are gone. (Before: each follower held one of the 40 threads for good; 41 took the API down.)"""
    srv = served()
    users = {f"u{i}": srv.http.post("/v1/users", json={"name": f"u{i}"}).json()["token"] for i in range(7)}
    followers = []
    for tok in list(users.values())[:6]:
        jid = srv.http.post("/v1/jobs", json=JOB, headers=_auth(tok)).json()["id"]
        followers += [srv.send_raw(f"/v1/jobs/{jid}/logs?follow=true", tok) for _ in range(7)]
    served.sockets.extend(followers)
    codes = [status_of(s)[0] for s in followers]
    assert codes == [200] * 42, f"followers' answers: {codes} (0: no answer within 10 s)"

    assert httpx.get(f"{srv.url}/healthz", timeout=5.0).status_code == 200
    other = users["u6"]
    assert srv.http.get("/v1/whoami", headers=_auth(other), timeout=5.0).json()["name"] == "u6"
    jid = srv.http.post("/v1/jobs", json=JOB, headers=_auth(other), timeout=5.0).json()["id"]
    assert srv.http.get(f"/v1/jobs/{jid}", headers=_auth(other), timeout=5.0).json()["status"] == "queued"
    _agent_beats(srv)
    limits = srv.app.state.limits
    assert limits.open_streams == 42
    assert httpx.get(f"{srv.url}/healthz", timeout=5.0).json()["limits"]["streams"] == 42

    for s in followers:
        s.close()
    wait_until(lambda: limits.open_streams == 0, 10, "the followers' streams closed after they hung up")
    assert httpx.get(f"{srv.url}/healthz", timeout=5.0).json()["limits"]["streams"] == 0


def test_open_streams_per_user_are_limited_with_a_clear_429(served):
    srv = served(max_streams_per_user=3)
    a = srv.http.post("/v1/users", json={"name": "alice"}).json()["token"]
    b = srv.http.post("/v1/users", json={"name": "bob"}).json()["token"]
    ja = srv.http.post("/v1/jobs", json=JOB, headers=_auth(a)).json()["id"]
    jb = srv.http.post("/v1/jobs", json=JOB, headers=_auth(b)).json()["id"]
    mine = [srv.send_raw(f"/v1/jobs/{ja}/logs?follow=true", a) for _ in range(3)]
    served.sockets.extend(mine)
    assert [status_of(s)[0] for s in mine] == [200] * 3
    r = srv.http.get(f"/v1/jobs/{ja}/logs", params={"follow": "true"}, headers=_auth(a))
    assert r.status_code == 429
    assert "alice already follows 3 log streams" in r.json()["message"]
    assert "max_streams_per_user" in r.json()["message"]
    theirs = srv.send_raw(f"/v1/jobs/{jb}/logs?follow=true", b)  # another user is not affected
    served.sockets.append(theirs)
    assert status_of(theirs)[0] == 200
    # a log read without follow is not a stream
    assert srv.http.get(f"/v1/jobs/{ja}/logs", headers=_auth(a)).status_code == 200
    mine[0].close()
    limits = srv.app.state.limits
    wait_until(lambda: limits.streams.get("alice") == 2, 10, "alice's closed stream released")
    again = srv.send_raw(f"/v1/jobs/{ja}/logs?follow=true", a)
    served.sockets.append(again)
    assert status_of(again)[0] == 200


def test_a_stream_ends_after_its_bounded_lifetime(served):
    srv = served(stream_max_seconds=0.5)
    tok = srv.http.post("/v1/users", json={"name": "alice"}).json()["token"]
    jid = srv.http.post("/v1/jobs", json=JOB, headers=_auth(tok)).json()["id"]
    with srv.http.stream("GET", f"/v1/jobs/{jid}/logs", params={"follow": "true"}, headers=_auth(tok)) as r:
        body = r.read().decode()
    assert r.status_code == 200 and "the stream ends after 0.5 s" in body and "stream_max_seconds" in body
    wait_until(lambda: srv.app.state.limits.open_streams == 0, 10, "the ended stream released")


@pytest.mark.parametrize("slots", [24, 50])
def test_slow_user_requests_leave_capacity_to_agents(served, db, tmp_path, slots):
    """60 users' requests that block in the thread pool (a stand-in route that waits on a gate, as a
    log read from an agent that does not answer does) cannot hold the threads the agents' heartbeats
    need, with the default 24 users' slots or with 50 (more than the pool's 40 threads: the pool
    grows); they are all served once the gate opens."""
    app = _app(db, tmp_path, **({} if slots == 24 else {"max_user_requests": slots}))
    gate = threading.Event()
    entered = []

    def slow() -> dict:
        entered.append(1)
        gate.wait(30)
        return {"ok": True}

    app.add_api_route("/v1/test/slow", slow, dependencies=[Depends(principal)])
    srv = served(app)
    tok = srv.http.post("/v1/users", json={"name": "alice"}).json()["token"]
    try:
        waiting = [srv.send_raw("/v1/test/slow", tok) for _ in range(60)]
        served.sockets.extend(waiting)
        wait_until(lambda: len(entered) >= min(slots, 40), 10, "slow requests under way")
        assert httpx.get(f"{srv.url}/healthz", timeout=5.0).status_code == 200
        _agent_beats(srv)
        limits = srv.app.state.limits
        wait_until(lambda: len(entered) == slots, 10, "every slot in use")
        assert limits.slots.used == limits.max_user_requests == slots  # the others wait
    finally:
        gate.set()
    assert [status_of(s)[0] for s in waiting] == [200] * 60


# -- per-user request rate ---------------------------------------------------------------------------

def test_request_rate_is_limited_per_user_and_services_are_exempt(api):
    c = api(rate_limit=0.01, rate_burst=5)
    a = c.post("/v1/users", json={"name": "alice"}).json()["token"]
    b = c.post("/v1/users", json={"name": "bob"}).json()["token"]
    codes = [c.get("/v1/whoami", headers=_auth(a)).status_code for _ in range(8)]
    assert codes[:5] == [200] * 5 and 429 in codes[5:]
    r = c.get("/v1/whoami", headers=_auth(a))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert "alice: over the rate limit of 0.01 requests/s" in r.json()["message"]
    assert "haiplatform.rate_limit" in r.json()["message"]
    assert c.get("/v1/whoami", headers=_auth(b)).status_code == 200  # bob has a bucket of his own
    for _ in range(20):  # agents and the scheduler are never rate-limited
        assert c.get("/v1/internal/wait", params={"timeout": 0}, headers=_auth(SERVICE)).status_code == 200


def test_the_client_raises_too_many_requests(api):
    from haiplatform.errors import TooManyRequests, error_for_status

    assert isinstance(error_for_status(429, "x"), TooManyRequests)


# -- finding 6: request size and integers --------------------------------------------------------------

def test_a_30_mb_body_is_413_before_it_is_read(api):
    c = api()
    big = b'{"name": "x", "command": ["' + b"a" * (30 << 20) + b'"]}'
    r = c.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"
    assert "over the API's limit of 1048576 bytes" in r.json()["message"]
    assert "haiplatform.max_body_bytes" in r.json()["message"]

    def chunks():  # no Content-Length: a chunked body, counted as it comes
        yield b'{"name": "x", "command": ["'
        for _ in range(30):
            yield b"a" * (1 << 20)
        yield b'"]}'

    r = c.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "haiplatform.max_body_bytes" in r.json()["message"]
    # a chunked body under the limit goes through
    r = c.post("/v1/jobs", content=iter([b'{"name": "x", ', b'"command": ["true"]}']),
               headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text


def test_the_body_limit_is_configurable(api):
    c = api(max_body_bytes=1000)
    r = c.post("/v1/jobs", json={**JOB, "env": {"X": "y" * 2000}})
    assert r.status_code == 413 and "limit of 1000 bytes" in r.json()["message"]
    assert c.post("/v1/jobs", json=JOB).status_code == 201


BIG = 2**63


@pytest.mark.parametrize("method,path,kw,field", [
    ("get", f"/v1/jobs/{BIG}", {}, "job_id"),
    ("post", f"/v1/jobs/{BIG}/stop", {}, "job_id"),
    ("post", f"/v1/jobs/{2**31}/suspend", {}, "job_id"),
    ("get", f"/v1/jobs/{BIG}/logs", {}, "job_id"),
    ("get", "/v1/jobs/1/logs", {"params": {"offset": BIG}}, "offset"),
    ("get", "/v1/jobs/1/logs", {"params": {"rank": BIG}}, "rank"),
    ("get", "/v1/jobs/1/logs", {"params": {"attempt": BIG}}, "attempt"),
    ("post", "/v1/jobs", {"json": {**JOB, "priority": BIG}}, "priority"),
    ("post", "/v1/jobs", {"json": {**JOB, "nodes": BIG}}, "nodes"),
    ("post", "/v1/jobs", {"json": {**JOB, "workdir": "/x\x00y"}}, "workdir"),
    ("post", "/v1/jobs", {"json": {**JOB, "command": ["a\x00b"]}}, "command"),
    ("put", "/v1/quotas", {"json": {"subject": "user:a", "max_nodes": BIG}}, "max_nodes"),
    ("delete", "/v1/quotas", {"params": {"subject": "user:a", "priority": BIG}}, "priority"),
    ("get", "/v1/events", {"params": {"job_id": BIG}}, "job_id"),
    ("get", "/v1/jobs", {"params": {"limit": BIG}}, "limit"),
    ("post", "/v1/nodes/n0/drain", {"json": {"reason": "r" * 201}}, "reason"),
])
def test_out_of_range_values_are_422_naming_the_field(api, method, path, kw, field):
    c = api()
    c.post("/v1/jobs", json=JOB)
    r = getattr(c, method)(path, **kw)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "InvalidRequest" and field in r.json()["message"]


@pytest.mark.parametrize("body,field", [
    ({"job_id": BIG, "rank": 0, "status": "running"}, "job_id"),
    ({"job_id": 1, "rank": BIG, "status": "running"}, "rank"),
    ({"job_id": 1, "rank": 0, "status": "failed", "exit_code": BIG}, "exit_code"),
    ({"job_id": 1, "rank": 0, "status": "running", "pid": BIG}, "pid"),
    ({"job_id": 1, "rank": 0, "status": "killed", "whole_life_state": BIG}, "whole_life_state"),
])
def test_agents_reports_are_bounded_too(api, body, field):
    c = api()
    h = _auth(SERVICE)
    assert c.post("/v1/agent/register", json={"node": "n0", "epoch": "e1"}, headers=h).status_code == 200
    r = c.post("/v1/agent/report", json={"node": "n0", "epoch": "e1", "ranks": [body]}, headers=h)
    assert r.status_code == 422 and field in r.json()["message"]
    r = c.post("/v1/agent/report", json={"node": "n0", "epoch": "e1", "master_ports": {str(BIG): 1}}, headers=h)
    assert r.status_code == 422 and "master_ports" in r.json()["message"]
    r = c.get("/v1/agent/sync", params={"node": "n0", "epoch": "e1", "seq": BIG, "timeout": 0}, headers=h)
    assert r.status_code == 422 and "seq" in r.json()["message"]


def test_the_schema_shows_the_bounds(api):
    paths = api().get("/openapi.json").json()["paths"]
    (job_id,) = [p for p in paths["/v1/jobs/{job_id}"]["get"]["parameters"] if p["name"] == "job_id"]
    assert job_id["schema"]["maximum"] == 2**31 - 1 and job_id["schema"]["minimum"] == 1
    offset = [p for p in paths["/v1/jobs/{job_id}/logs"]["get"]["parameters"] if p["name"] == "offset"][0]
    assert offset["schema"]["maximum"] == 2**53


def test_users_slots_hand_over_in_order_and_time_out():
    import asyncio

    from haiplatform.limits import Slots

    async def scenario() -> list:
        slots = Slots(2)
        assert await slots.acquire(1.0) and await slots.acquire(1.0)
        assert await slots.acquire(0.01) is False  # full: the caller answers 503
        got = []

        async def waiter(i: int) -> None:
            if await slots.acquire(5.0):
                got.append(i)

        tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
        await asyncio.sleep(0)
        tasks[1].cancel()  # a client that went away while it waited gives nothing back
        slots.release()
        slots.release()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5.0)
        return [got, slots.used]

    assert asyncio.run(scenario()) == [[0, 2], 2]


def test_token_bucket_refills_at_its_rate():
    from haiplatform.limits import TokenBucket

    b = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(0.0) == 0.5            # the next token in half a second
    assert b.take(0.5) == 0.0 and b.take(0.5) > 0
    assert [b.take(100.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # never more than the burst
