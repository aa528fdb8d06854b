"""The web dashboard over HTTP (in-process, a real SQLite database): login and logout, sessions,
the API's permissions on every page and action, CSRF, escaping, redirects and security headers."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from haiplatform.api import bootstrap, create_app
from haiplatform.config import HaiConfig
from haiplatform.db import Database, Job, NodeRow, User, migrate
from haiplatform.web.session import COOKIE, Sessions
from haiplatform.web.views import CSP, safe_next
from network import load_cluster

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local.toml"
ADMIN = "admin-tok"
JOB = {"name": "train", "command": ["python", "-c", "print(1)"], "nodes": 1}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    url = f"sqlite:///{tmp / 'hai.db'}"
    migrate(url)
    db = Database(url)
    cfg = HaiConfig(state_dir=tmp / "state", admin_token=ADMIN, cluster_secret="cluster-secret")
    cfg.state_dir.mkdir()
    bootstrap(cfg, db)
    yield create_app(load_cluster(LOCAL_CLUSTER), cfg, db)
    db.dispose()


@pytest.fixture(scope="module")
def api(app):
    """The JSON API as the admin (to set things up)."""
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {ADMIN}"
        yield c


@pytest.fixture(scope="module")
def users(api):
    toks = {}
    for name, group in (("alice", "vision"), ("bob", "vision"), ("carol", "nlp")):
        r = api.post("/v1/users", json={"name": name, "group": group})
        assert r.status_code == 201, r.text
        toks[name] = r.json()["token"]
    return toks


def browser(app) -> TestClient:
    """A client with its own cookie jar and no token header: a browser."""
    return TestClient(app, base_url="http://testserver")


def login(c: TestClient, token: str, next_url: str = "/ui/"):
    form = c.get(f"/ui/login?next={next_url}")
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text).group(1)
    return c.post("/ui/login", data={"token": token, "nonce": nonce, "next": next_url}, follow_redirects=False)


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def submit(api, token, **kw) -> int:
    r = api.post("/v1/jobs", json={**JOB, **kw}, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.text
    return r.json()["chain_id"]


def test_login_session_cookie_and_logout(app, users):
    c = browser(app)
    r = c.get("/ui/nodes", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=/ui/nodes"
    assert login(c, "wrong-token").status_code == 401
    r = login(c, users["alice"], "/ui/nodes")
    assert r.status_code == 303 and r.headers["location"] == "/ui/nodes"
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(COOKIE + "="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    sid = cookie.split(";")[0].split("=", 1)[1]
    assert users["alice"] not in cookie and len(sid) >= 40  # a random id, not the token
    page = c.get("/ui/nodes")
    assert page.status_code == 200 and "alice" in page.text
    assert page.headers["content-security-policy"] == CSP and "'unsafe-inline'" not in CSP
    assert c.post("/ui/logout", data={}, follow_redirects=False).status_code == 403  # no CSRF token
    r = c.post("/ui/logout", data={"csrf": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
    stolen = browser(app)  # the old cookie, replayed, opens nothing: the session is gone server-side
    stolen.cookies.set(COOKIE, sid, path="/ui")
    assert stolen.get("/ui/", follow_redirects=False).status_code == 303


def test_login_needs_the_forms_nonce_and_a_users_token(app, users):
    c = browser(app)
    c.get("/ui/login")
    r = c.post("/ui/login", data={"token": users["alice"], "nonce": "forged", "next": "/ui/"}, follow_redirects=False)
    assert r.status_code == 403 and "expired" in r.text  # login CSRF: the nonce cookie must match
    r = login(c, "cluster-secret")
    assert r.status_code == 403 and "a user&#39;s token" in r.text


def test_a_disabled_user_is_logged_out_at_once(app, users, api):
    c = browser(app)
    assert login(c, users["carol"]).status_code == 303
    assert c.get("/ui/", follow_redirects=False).status_code == 200
    st = app.state.api
    with st.db.write() as s:
        s.query(User).filter(User.name == "carol").one().active = False
    st.token_cache.clear()  # what 2 s of the API's token cache would do
    try:
        assert c.get("/ui/", follow_redirects=False).status_code == 303
    finally:
        with st.db.write() as s:
            s.query(User).filter(User.name == "carol").one().active = True
        st.token_cache.clear()


def test_a_user_cannot_see_or_stop_anothers_job_unless_shared(app, api, users):
    private = submit(api, users["alice"], name="alice-private")
    shared = submit(api, users["alice"], name="alice-shared", shared_in_group=True)
    bob = browser(app)
    login(bob, users["bob"])
    listing = bob.get("/ui/").text  # the queue is everyone's to read (queue_visibility "all"), the jobs are not
    assert 'id="queue"' in listing and "alice-shared" in listing and "alice-private" in listing
    r = bob.get(f"/ui/jobs/{private}")
    assert r.status_code == 403 and "belongs to alice" in r.text
    csrf = csrf_of(bob.get(f"/ui/jobs/{shared}").text)
    r = bob.post(f"/ui/jobs/{private}/stop", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 403
    assert api.get(f"/v1/jobs/{private}").json()["status"] == "queued"
    assert bob.get(f"/ui/jobs/{private}/logs/0").status_code == 403
    r = bob.post(f"/ui/jobs/{shared}/stop", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/ui/jobs/{shared}?done=stop"
    assert "Stop requested." in bob.get(r.headers["location"]).text
    kinds = [e["kind"] for e in api.get("/v1/events", params={"job_id": shared}).json()]
    assert "stop_requested" in kinds and "stop_requested" not in [
        e["kind"] for e in api.get("/v1/events", params={"job_id": private}).json()]
    carol = browser(app)
    login(carol, users["carol"])
    assert carol.get(f"/ui/jobs/{shared}").status_code == 403  # another group


def test_admin_pages_are_refused_to_users(app, users):
    alice = browser(app)
    login(alice, users["alice"])
    r = alice.get("/ui/admin")
    assert r.status_code == 403 and "not an admin" in r.text and "Users &amp; quotas" not in r.text
    admin = browser(app)
    login(admin, ADMIN)
    r = admin.get("/ui/admin")
    assert r.status_code == 200 and all(n in r.text for n in ("alice", "bob", "carol"))


def test_actions_need_the_sessions_csrf_token_and_the_same_origin(app, api, users):
    jid = submit(api, users["alice"], name="csrf-target")
    c = browser(app)
    login(c, users["alice"])
    page = c.get(f"/ui/jobs/{jid}").text
    assert f'action="/ui/jobs/{jid}/stop"' in page
    for data, headers in (({}, {}), ({"csrf": "guess"}, {}),
                          ({"csrf": csrf_of(page)}, {"Origin": "https://evil.example"})):
        r = c.post(f"/ui/jobs/{jid}/stop", data=data, headers=headers, follow_redirects=False)
        assert r.status_code == 403, (data, headers)
    assert api.get(f"/v1/jobs/{jid}").json()["status"] == "queued"
    other = browser(app)  # another session's token is not this one's
    login(other, users["alice"])
    r = other.post(f"/ui/jobs/{jid}/stop", data={"csrf": csrf_of(page)}, follow_redirects=False)
    assert r.status_code == 403
    r = c.post(f"/ui/jobs/{jid}/stop", data={"csrf": csrf_of(page)}, follow_redirects=False)
    assert r.status_code == 303
    r = c.post(f"/ui/jobs/{jid}/stop", data={"csrf": csrf_of(page)}, follow_redirects=False)
    assert r.status_code == 409 and "already" in r.text  # the API's own conflict, shown


def test_user_controlled_text_is_escaped(app, api, users):
    evil = '<script>alert("x")</script>'
    jid = submit(api, users["alice"], command=["echo", evil, "<img src=x onerror=alert(1)>"])
    st = app.state.api
    with st.db.write() as s:  # a name the API would refuse now, stored before (or by another way in)
        s.get(Job, jid).name = evil
        s.merge(NodeRow(name="n1", address="127.0.0.2", zone="z", leaf="l", gpus=0, cpus=1, memory_gib=1,
                        state="up", drained=True, drain_reason="<b>bad</b> disk", last_seen=time.time(), facts={}))
    c = browser(app)
    login(c, users["alice"])
    for page in (c.get("/ui/").text, c.get(f"/ui/jobs/{jid}").text, c.get(f"/ui/jobs/{jid}/logs/0").text):
        assert "<script>alert" not in page and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    job = c.get(f"/ui/jobs/{jid}").text
    assert "<img src=x" not in job and "&lt;img src=x onerror=alert(1)&gt;" in job
    nodes = c.get("/ui/nodes").text
    assert "<b>bad</b>" not in nodes and "&lt;b&gt;bad&lt;/b&gt; disk" in nodes


def test_login_redirects_only_into_the_dashboard(app, users):
    for bad in ("https://evil.example/", "//evil.example/ui/", "/ui/\\evil", "/v1/jobs", "/ui/x\ny", "", None):
        assert safe_next(bad) == "/ui/", bad
    assert safe_next("/ui/jobs/3?done=stop") == "/ui/jobs/3?done=stop"
    c = browser(app)
    r = login(c, users["alice"], "//evil.example/")
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    r = c.get("/ui/jobs/1?done=<script>")  # a notice comes from a fixed table, never from the URL
    assert "<script>" not in r.text


def test_fs3_page_says_plainly_when_mgmtd_is_out_of_reach(app, users):
    c = browser(app)
    login(c, users["alice"])
    r = c.get("/ui/fs3")  # local.toml has fs3, but no mgmtd runs here
    assert r.status_code == 200 and "cannot reach fs3.mgmtd at 127.0.0." in r.text


def test_static_files_and_unknown_names():
    from fastapi import FastAPI

    from haiplatform.web import install

    a = FastAPI()
    install(a)
    c = TestClient(a)
    r = c.get("/ui/static/follow.js")
    assert r.status_code == 200 and "textContent" in r.text and r.headers["content-type"].startswith("text/javascript")
    assert c.get("/ui/static/%2e%2e%2fviews.py").status_code == 404
    assert c.get("/ui/static/nope.js").status_code == 404


def test_sessions_expire_are_bounded_and_drop():
    s = Sessions(ttl=0.05, max_sessions=2)
    a, _ = s.create("t1", "alice")
    b, _ = s.create("t2", "bob")
    c, _ = s.create("t3", "carol")
    assert s.get(a) is None and s.get(b).user == "bob" and s.get(c).user == "carol"  # the oldest went
    s.drop(b)
    assert s.get(b) is None
    time.sleep(0.06)
    assert s.get(c) is None and len(s) == 0
    assert s.get("x" * 500) is None and s.get(None) is None
    with pytest.raises(ValueError, match="ttl"):
        Sessions(ttl=0)


def test_hold_release_only_for_the_owner_and_history_filters(app, api, users):
    jid = submit(api, users["alice"], name="holdme", shared_in_group=True)
    alice, bob = browser(app), browser(app)
    login(alice, users["alice"])
    login(bob, users["bob"])
    page = alice.get(f"/ui/jobs/{jid}").text
    assert 'id="action-hold"' in page and 'id="action-release"' not in page
    bob_page = bob.get(f"/ui/jobs/{jid}").text  # shared: bob may stop it, not hold it
    assert 'id="action-stop"' in bob_page and 'id="action-hold"' not in bob_page
    r = bob.post(f"/ui/jobs/{jid}/hold", data={"csrf": csrf_of(bob_page)}, follow_redirects=False)
    assert r.status_code == 403 and "only its owner or an admin" in r.text
    r = alice.post(f"/ui/jobs/{jid}/hold", data={"csrf": csrf_of(page)}, follow_redirects=False)
    assert r.status_code == 303
    page = alice.get(r.headers["location"]).text
    assert "Job held." in page and 'id="action-release"' in page and "hai release" in page
    alice.post(f"/ui/jobs/{jid}/release", data={"csrf": csrf_of(page)})
    assert api.get(f"/v1/jobs/{jid}").json()["held"] is False
    # the history: an ended chain, filtered by status and by the day it ended
    with app.state.api.db.write() as s:
        j = s.get(Job, jid)
        now = time.time()
        j.status, j.exit_code, j.started_at, j.finished_at = "failed", 3, now - 60.5, now
    today = time.strftime("%Y-%m-%d", time.gmtime())
    hist = alice.get("/ui/", params={"status": "failed", "since": today}).text.split('id="history"', 1)[1]
    assert f'data-job="{jid}"' in hist and "holdme" in hist and "1m00s" in hist
    assert "holdme" not in alice.get("/ui/", params={"status": "succeeded"}).text.split("History", 1)[1]
    r = alice.get("/ui/", params={"since": "yesterday"})
    assert r.status_code == 422 and "not a date" in r.text


def test_crafted_forms_and_filters_are_refused_not_500(app, api, users):
    c = browser(app)
    c.get("/ui/login")  # a nonce cookie; the form's field is not ASCII: parse_qs makes it a str with é
    r = c.post("/ui/login", content=b"token=x&nonce=%C3%A9&next=/ui/",
               headers={"content-type": "application/x-www-form-urlencoded"}, follow_redirects=False)
    assert r.status_code == 403 and "expired" in r.text
    login(c, users["alice"])
    r = c.post("/ui/logout", content=b"csrf=%C3%A9", headers={"content-type": "application/x-www-form-urlencoded"},
               follow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    for q in ("name=%00", "user=a%00b"):  # PostgreSQL cannot hold a NUL: refused before the database
        r = c.get(f"/ui/?{q}")
        assert r.status_code == 422, (q, r.status_code)
    # the follow script's poll of another user's private job is refused as the page is
    private = submit(api, users["alice"], name="alice-more")
    bob = browser(app)
    login(bob, users["bob"])
    r = bob.get(f"/ui/jobs/{private}/logs/0/more", params={"offset": 0})
    assert r.status_code == 403 and "belongs to alice" in r.text


def test_cookies_secure_behind_a_tls_proxy_only_when_configured(app, users):
    cfg = app.state.api.cfg
    c = browser(app)
    assert "Secure" not in c.get("/ui/login").headers["set-cookie"]
    forwarded = {"X-Forwarded-Proto": "https"}
    assert "Secure" not in c.get("/ui/login", headers=forwarded).headers["set-cookie"]  # "auto": not believed
    try:
        cfg.web_secure_cookies = "proxy"
        assert "Secure" in c.get("/ui/login", headers=forwarded).headers["set-cookie"]
        assert "Secure" not in c.get("/ui/login").headers["set-cookie"]
        cfg.web_secure_cookies = "always"
        assert "Secure" in c.get("/ui/login").headers["set-cookie"]
        s = TestClient(app, base_url="https://testserver")  # a Secure cookie goes back over https only
        r = login(s, users["alice"])
        assert "Secure" in next(h for h in r.headers.get_list("set-cookie") if h.startswith(COOKIE + "="))
    finally:
        cfg.web_secure_cookies = "auto"


def test_fs3_health_reads_a_malformed_status_as_an_error(monkeypatch):
    from haiplatform.web import fs3health

    cluster = load_cluster(LOCAL_CLUSTER)
    answers = [{"nodes": {"s1": {"address": "1.2.3.4"}}, "chains": {}}]  # no port, no alive

    class FakeRpc:  # mgmtd's answer only: the RPC itself is tested by the fs3 tests
        def __init__(self, *a, **kw): pass
        def __enter__(self): return self
        def __exit__(self, *a): pass
        def call(self, method, params):
            answers.append(answers[0])
            return type("R", (), {"result": answers[0]})()

    import network

    monkeypatch.setattr(network, "RpcClient", FakeRpc)
    monkeypatch.setattr("network.auth.load_cluster_key", lambda c: b"k")
    monkeypatch.setattr(fs3health, "_cache", {})
    h = fs3health.fs3_health(cluster)
    assert h.present and "cannot read" in h.error and "KeyError" in h.error
    assert fs3health.fs3_health(cluster) is h and len(answers) == 2  # cached: one RPC for both
    assert fs3health.fs3_health(cluster, max_age=0) is not h and len(answers) == 3
