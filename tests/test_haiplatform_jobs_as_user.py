"""Jobs run as their user's Unix account, with credentials scoped to themselves (issue #14, finding 2:
ranks ran as root, so `hai exec sh -c 'cat $(dirname $HAI_CLUSTER_FILE)/hai/admin.token'` printed
the admin token).

The end-to-end tests need root (the agents switch accounts and create them); as another user they
are skipped with the reason. The unit tests below them run everywhere."""

from __future__ import annotations

import json
import os
import pwd
import stat
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from _waits import wait_until

from haiplatform.config import HaiConfig, load_config
from haiplatform.errors import AccountError, ConfigError
from haiplatform.jobtoken import chain_of, job_token

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "deploy" / "clusters" / "local.toml"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the agents switch to the jobs' accounts only as root")

#: planted in the agents' environment: no job may see it
AGENT_SECRET = "agent-env-secret-5b1f"


@pytest.fixture
def tmp_path(job_tmp_path):
    """Run dirs and the jobs' scripts where the jobs' accounts can reach them."""
    return job_tmp_path


def hai_cluster(tmp_path, launch_cluster, **hai):
    from haiplatform.client import HaiClient

    raw = tomllib.loads(LOCAL_CLUSTER.read_text())
    raw["haiplatform"] = {**raw.get("haiplatform", {}), **hai}
    raw["service"] = [s for s in raw["service"] if s["module"].startswith("haiplatform.")]
    f = tmp_path / "cluster.toml"
    f.write_text(tomli_w.dumps(raw))
    lc = launch_cluster(f, env={"FIREFLYER_TEST_SECRET": AGENT_SECRET, "HAI_TOKEN": AGENT_SECRET})
    addr, port = lc.cluster.endpoint("haiplatform.api")
    admin = HaiClient(f"http://{addr}:{port}", (lc.run_dir / "hai" / "admin.token").read_text().strip())
    deadline = time.monotonic() + 30
    while len([n for n in admin.nodes() if n["state"] == "up"]) < 4:
        assert time.monotonic() < deadline, "agents did not register"
        time.sleep(0.05)
    return lc, admin


def user_client(admin, name):
    from haiplatform.client import HaiClient

    return HaiClient(admin.url, admin.add_user(name)["token"])


def result(client, job_id) -> dict:
    out = client.logs(job_id)
    assert "RESULT " in out, out
    return json.loads(out.split("RESULT ", 1)[1].splitlines()[0])


PROBE = """
import errno, json, os, sys
out = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "env": dict(os.environ), "paths": {}}
for p in sys.argv[1:]:
    try:
        try:
            os.listdir(p)
        except NotADirectoryError:
            open(p, "rb").read(1)
        out["paths"][p] = "read"
    except OSError as e:
        out["paths"][p] = errno.errorcode.get(e.errno, str(e.errno))
if os.environ.get("FIREFLYER_CREDENTIAL"):  # its own fs3 credential: readable by itself
    cred = json.load(open(os.environ["FIREFLYER_CREDENTIAL"]))
    out["credential"] = [cred["key_id"], cred["expires"]]
print("RESULT " + json.dumps(out), flush=True)
"""

SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(300)\n"


@needs_root
def test_a_job_runs_as_its_account_and_cannot_reach_secrets_or_other_jobs(launch_cluster, tmp_path):
    lc, admin = hai_cluster(tmp_path, launch_cluster)
    alice, bob = user_client(admin, "alice"), user_client(admin, "bob")
    run, hai = lc.run_dir, lc.run_dir / "hai"
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    (tmp_path / "probe.py").write_text(PROBE)
    # bob's job runs; alice's job goes looking for everything it must not reach
    b = bob.submit({"name": "bobs", "command": [sys.executable, str(tmp_path / "sleeper.py")], "nodes": 1})
    bj = wait_until(lambda: (j := bob.job(b["id"]))["status"] == "running" and "up" in bob.logs(b["id"]) and j,
                  what="bob's job to run")
    bob_node, bob_pid = bj["ranks"][0]["node"], bj["ranks"][0]["pid"]
    bob_control = run / "hai-control" / bob_node / f"job-{b['id']}"
    secret_paths = [hai / "admin.token", hai / "cluster.secret", hai / "hai.db", hai, hai / "logs",
                    hai / f"agent-{bob_node}.json", run / "logs", run / "data", bob_control,
                    bob_control / "credential", Path(f"/proc/{bob_pid}/environ")]
    if (run / "secrets" / "cluster.key").exists():  # the launcher's cluster key (network.auth)
        secret_paths.append(run / "secrets" / "cluster.key")
    assert all(p.exists() for p in secret_paths if p.name != "credential")  # they are there, as root sees
    a = alice.submit({"name": "probe", "command": [sys.executable, str(tmp_path / "probe.py"),
                                                   *map(str, secret_paths), str(run / "cluster.toml")],
                      "nodes": 1})
    done = alice.wait(a["id"], timeout=30)
    assert done["status"] == "succeeded", alice.logs(a["id"])
    r = result(alice, a["id"])
    acct = pwd.getpwnam("hai-alice")
    assert (r["uid"], r["euid"], r["gid"]) == (acct.pw_uid, acct.pw_uid, acct.pw_gid) and r["uid"] != 0
    assert acct.pw_uid != pwd.getpwnam("hai-bob").pw_uid
    paths = r["paths"]
    assert paths.pop(str(run / "cluster.toml")) == "read"  # the cluster description it needs
    assert paths == {str(p): "EACCES" for p in secret_paths}
    # its own control directory is its own: it could list it (and write its state there)
    ctl = Path(r["env"]["HAI_CONTROL"])
    assert ctl.stat().st_uid == acct.pw_uid and stat.S_IMODE(ctl.stat().st_mode) == 0o700
    assert stat.S_IMODE(hai.stat().st_mode) == 0o700 and stat.S_IMODE((hai / "admin.token").stat().st_mode) == 0o600
    assert {stat.S_IMODE(p.stat().st_mode) for p in (run / "hai-control", ctl.parent)} == {0o711}
    # the environment: the documented set, no service variable, no secret
    env = r["env"]
    assert env["USER"] == "hai-alice" and env["HAI_USER"] == "alice" and env["HAI_JOB_ID"] == str(a["id"])
    assert not [k for k in env if k.startswith("FIREFLYER_") and k != "FIREFLYER_CREDENTIAL"]
    secrets = {AGENT_SECRET, (hai / "admin.token").read_text().strip(), (hai / "cluster.secret").read_text().strip()}
    assert not [k for k, v in env.items() if any(s in v for s in secrets)]
    assert env["HAI_TOKEN"] == env["HAI_JOB_TOKEN"].strip() and env["HAI_JOB_TOKEN"].startswith("job.")
    # its fs3 credential: job:<chain> with the account's ids (fs3 checks file permissions as that
    # user), with an expiry, in its control directory (gone once it ended)
    assert env["FIREFLYER_CREDENTIAL"] == str(ctl / "credential")
    assert r["credential"][0] == f"job:{a['id']}/uid={acct.pw_uid}/gid={acct.pw_gid}"
    assert r["credential"][1] > time.time()
    assert not (ctl / "credential").exists()
    bob.stop(b["id"])
    assert bob.wait(b["id"], timeout=30)["status"] == "stopped"


JOB_API = """
import json, os, sys
from haiplatform.client import HaiClient
from haiplatform.errors import ApiError
c = HaiClient(os.environ["HAI_URL"], os.environ["HAI_JOB_TOKEN"], timeout=10)
me, other = int(os.environ["HAI_JOB_ID"]), int(sys.argv[1])
def status(fn, *a, **kw):
    try:
        fn(*a, **kw)
        return 200
    except ApiError as e:
        return e.status
out = {"own": status(c.job, me), "own_logs": status(c.logs, me), "other": status(c.job, other),
       "other_logs": status(c.logs, other), "list": status(c.jobs), "users": status(c.users),
       "nodes": status(c.nodes), "stop_own": status(c.stop, me), "suspend_other": status(c.suspend, other),
       "submit": status(c.submit, {"name": "x", "command": ["true"]}), "drain": status(c.drain, "n0"),
       "whoami": c.whoami(), "token": os.environ["HAI_JOB_TOKEN"]}
print("RESULT " + json.dumps(out), flush=True)
"""


@needs_root
def test_a_job_token_reads_its_own_job_only_and_dies_with_it(launch_cluster, tmp_path):
    from haiplatform.client import HaiClient
    from haiplatform.errors import AuthError

    lc, admin = hai_cluster(tmp_path, launch_cluster, accounts={"mallory": "root"})
    alice = user_client(admin, "alice")
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    (tmp_path / "api.py").write_text(JOB_API)
    other = admin.submit({"name": "other", "command": [sys.executable, str(tmp_path / "sleeper.py")], "nodes": 1})
    j = alice.submit({"name": "api", "command": [sys.executable, str(tmp_path / "api.py"), str(other["id"])],
                      "nodes": 1})
    assert alice.wait(j["id"], timeout=30)["status"] == "succeeded", alice.logs(j["id"])
    r = result(alice, j["id"])
    assert (r["own"], r["own_logs"]) == (200, 200)
    assert {k: r[k] for k in ("other", "other_logs", "list", "users", "nodes", "stop_own", "suspend_other",
                              "submit", "drain")} == dict.fromkeys(("other", "other_logs", "list", "users", "nodes",
                                                                     "stop_own", "suspend_other", "submit", "drain"),
                                                                    403)
    assert r["whoami"] == {"name": "alice", "role": "job", "group": None, "job": j["id"]}
    # the job has finished: its token is worth nothing now; nor is a forged one for a live job
    time.sleep(2.1)  # the API caches a token's principal for 2 s
    with pytest.raises(AuthError, match="invalid job token"):
        HaiClient(admin.url, r["token"]).job(j["id"])
    forged = f"job.{other['id']}.{r['token'].rsplit('.', 1)[1]}"
    with pytest.raises(AuthError, match="invalid job token"):
        HaiClient(admin.url, forged).job(other["id"])
    # a user mapped to root, or a working directory its account cannot enter: the job does not start
    mallory = user_client(admin, "mallory")
    m = mallory.submit({"name": "m", "command": ["id"], "nodes": 1})
    done = mallory.wait(m["id"], timeout=30)
    assert done["status"] == "failed" and "root or the services' account" in done["ranks"][0]["message"]
    k = alice.submit({"name": "k", "command": ["ls"], "nodes": 1, "workdir": str(lc.run_dir / "hai" / "logs")})
    assert alice.wait(k["id"], timeout=30)["status"] == "failed"
    assert "hai-alice cannot enter the working directory" in alice.logs(k["id"])
    # no working directory at all (an API client): the job starts in the account's home, or /
    n = alice.submit({"name": "n", "command": ["pwd"], "nodes": 1})
    assert alice.wait(n["id"], timeout=30)["status"] == "succeeded", alice.logs(n["id"])
    admin.stop(other["id"])
    admin.wait(other["id"], timeout=30)


# -- units (any user) -------------------------------------------------------------------------------

def test_job_token_names_its_chain_and_cannot_be_forged():
    tok = job_token("s3cret", 42)
    assert tok.startswith("job.42.") and chain_of("s3cret", tok) == 42
    assert chain_of("other-secret", tok) is None
    assert chain_of("s3cret", tok.replace("job.42.", "job.43.")) is None
    assert chain_of("s3cret", "job.x.y") is None and chain_of("s3cret", "plain-user-token") is None


def _cluster_file(tmp_path, mode=0o644, **hai):
    raw = tomllib.loads(LOCAL_CLUSTER.read_text())
    raw["haiplatform"] = {**raw.get("haiplatform", {}), **hai}
    f = tmp_path / "c.toml"
    f.write_text(tomli_w.dumps(raw))
    f.chmod(mode)
    from network import load_cluster

    return load_cluster(f)


def test_config_account_mapping_and_no_inline_secrets(tmp_path, monkeypatch):
    from haiplatform.accounts import account_name, resolve_account

    monkeypatch.setenv("FIREFLYER_RUN_DIR_CLUSTER", str(tmp_path / "run"))
    cfg = load_config(_cluster_file(tmp_path, accounts={"alice": "alice2"}))
    assert (account_name(cfg, "alice"), account_name(cfg, "bob")) == ("alice2", "hai-bob")
    assert cfg.create_accounts is True and cfg.control_root() == tmp_path / "run" / "hai-control"
    assert stat.S_IMODE((tmp_path / "run" / "hai").stat().st_mode) == 0o700
    with pytest.raises(ConfigError, match="job_account: expected a pattern with {user}"):
        load_config(_cluster_file(tmp_path, job_account="jobs"))
    with pytest.raises(ConfigError, match="create_accounts: expected bool"):
        load_config(_cluster_file(tmp_path, create_accounts="yes"))
    with pytest.raises(ConfigError, match="admin_token: a secret in the cluster description"):
        load_config(_cluster_file(tmp_path, admin_token="t0ken"))
    assert load_config(_cluster_file(tmp_path, 0o600, admin_token="t0ken")).admin_token == "t0ken"
    with pytest.raises(AccountError, match="not a valid account name"):
        account_name(HaiConfig(tmp_path, job_account="{user}"), "x" * 40)
    cfg = HaiConfig(tmp_path, job_account="fireflyer-nonexistent-{user}", create_accounts=False)
    with pytest.raises(AccountError, match="no Unix account 'fireflyer-nonexistent-al' on n1 .* create it"):
        resolve_account(cfg, "al", "n1")


def test_rank_environment_keeps_nothing_of_the_agent_but_the_documented_set():
    from haiplatform.agent import base_env

    env = base_env("hai-al", "/home/x", {"PATH": "/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "HAI_TOKEN": "t",
                                          "FIREFLYER_RUN_DIR_CLUSTER": "/r", "PGPASSWORD": "p", "HOME": "/root"})
    assert env == {"PATH": "/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "HOME": "/home/x", "USER": "hai-al",
                   "LOGNAME": "hai-al"}


def test_agent_writes_into_a_control_dir_through_no_link(tmp_path):
    from haiplatform.agent import _read_small, _write_file

    target = tmp_path / "precious"
    target.write_text("keep")
    (tmp_path / "suspend").symlink_to(target)
    with pytest.raises(OSError):
        _write_file(tmp_path / "suspend", "1", None)
    os.link(target, tmp_path / "hard")
    with pytest.raises(OSError, match="not a plain file"):
        _write_file(tmp_path / "hard", "1", None)
    (tmp_path / "whole_life_state").symlink_to(target)
    with pytest.raises(OSError):
        _read_small(tmp_path / "whole_life_state")
    assert target.read_text() == "keep"
    _write_file(tmp_path / "fresh", "7", None)
    assert _read_small(tmp_path / "fresh") == "7"
