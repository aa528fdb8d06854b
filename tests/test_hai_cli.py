"""The researcher's ``hai`` (issue 19): pure parts without processes, then one local cluster (real API,
scheduler and 4 agents) shared by the end-to-end tests of this module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _hai import cluster_file_factory
from _waits import wait_until
from typer.testing import CliRunner

from haiplatform.cli import PANELS, app, parse_job_ref, parse_when
from haiplatform.cli.jobs import _short_command

ROOT = Path(__file__).resolve().parent.parent
DEAD = ["--url", "http://127.0.0.1:1", "--token", "x"]  # nothing listens: a command that reaches it fails


def cli(*args, env=None):
    return CliRunner().invoke(app, list(args), env=env)


# -- without a cluster ------------------------------------------------------------------------------

def test_job_ids_chain_and_restart():
    assert parse_job_ref("12") == (12, None) and parse_job_ref("12.1") == (12, 1)
    for bad in ("", "x", "1.", ".1", "1.2.3", "-1", "0", "1e3"):
        with pytest.raises(ValueError, match="CHAIN or CHAIN.RESTART"):
            parse_job_ref(bad)
    r = cli(*DEAD, "status", "2.x")
    assert r.exit_code == 2 and "CHAIN or CHAIN.RESTART" in r.output and "Traceback" not in r.output


def test_dates_for_history():
    now = 1_700_000_000.0
    assert parse_when("2h", now) == now - 7200 and parse_when("3d", now) == now - 3 * 86400
    assert parse_when("2024-05-01") == time.mktime((2024, 5, 1, 0, 0, 0, 0, 0, -1))
    assert parse_when("2024-05-01T13:30") == time.mktime((2024, 5, 1, 13, 30, 0, 0, 0, -1))
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_when("yesterday")
    r = cli(*DEAD, "history", "--since", "soon")
    assert r.exit_code == 2 and "--since" in r.output and "YYYY-MM-DD" in r.output


def test_help_lists_job_options_and_panels():
    r = cli("python", "--help")
    for opt in ("--nodes", "--procs-per-node", "--priority", "--time", "--name", "--env", "--array", "--after",
                "--after-ok", "--hold", "--output", "--follow", "--json"):
        assert opt in r.output, opt
    top = cli("--help").output
    for panel in PANELS:
        assert panel in top
    assert "130" in top  # the exit codes are said


def test_bad_job_options_are_refused_with_the_reason(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("pass\n")
    for args, why in ((["--name", ""], "--name ''"), (["--nodes", "0"], "at least 1 node"),
                      (["--procs-per-node", "0"], "--procs-per-node 0")):
        r = cli(*DEAD, "python", *args, str(script))
        assert r.exit_code == 2 and why in r.output and "cannot reach" not in r.output, r.output
        r = cli(*DEAD, "python", str(script), "--", *args)  # the older form: the same checks
        assert r.exit_code == 2 and why in r.output, r.output


def test_option_after_the_program_is_warned_about():
    r = cli(*DEAD, "exec", "true", "--nodes", "1")
    assert "warning: --nodes" in r.output and "goes to the program" in r.output
    r = cli(*DEAD, "exec", "--nodes", "1", "true", "--lr", "1")
    assert "warning" not in r.output


def test_relative_cluster_file_from_elsewhere_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("list", env={"HAI_CLUSTER": "deploy/clusters/local.toml", "HAI_URL": "", "HAI_TOKEN": ""})
    assert r.exit_code == 1 and "Traceback" not in r.output
    (line,) = r.output.strip().splitlines()
    assert "deploy/clusters/local.toml" in line and str(tmp_path) in line and "absolute path" in line


def test_errors_under_json_are_json_objects():
    r = CliRunner().invoke(app, [*DEAD, "list", "--json"])
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert set(out) == {"error", "status"} and "cannot reach the API" in out["error"] and out["status"] == 503
    r = CliRunner().invoke(app, [*DEAD, "exec", "--json", "--nodes", "0", "true"])
    assert r.exit_code == 2 and "at least 1 node" in json.loads(r.stdout)["error"]


def test_clicks_own_usage_errors_are_json_under_json(capsys):
    from haiplatform.cli import main

    for args in (["list", "--bogus", "--json"], ["list", "--json", "--limit", "x"], ["status", "--json"]):
        with pytest.raises(SystemExit) as e:
            main([*DEAD, *args])
        out = json.loads(capsys.readouterr().out)
        assert e.value.code == 2 and set(out) == {"error", "status"} and "--help" in out["error"], (args, out)
    with pytest.raises(SystemExit) as e:  # without --json: click's own text, on stderr
        main([*DEAD, "list", "--bogus"])
    assert e.value.code == 2 and "--bogus" in capsys.readouterr().err


def test_init_checks_url_and_token_before_saving(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    r = cli("init", "garbage", "--url", "http://127.0.0.2:1", env=env)
    assert r.exit_code == 1 and "cannot check the token at http://127.0.0.2:1" in r.output and "nothing saved" in r.output
    assert not (tmp_path / "hai" / "config.json").exists()
    r = cli("init", "garbage", "--url", "http://127.0.0.2:1", "--no-check", env=env)
    assert r.exit_code == 0 and json.loads((tmp_path / "hai" / "config.json").read_text())["token"] == "garbage"
    saved = lambda: json.loads((tmp_path / "hai" / "config.json").read_text())["token"]  # noqa: E731
    (tmp_path / "tok").write_text("from-a-file\n")
    r = cli("init", "--url", "http://127.0.0.2:1", "--no-check", "--token-file", str(tmp_path / "tok"), env=env)
    assert r.exit_code == 0 and saved() == "from-a-file", r.output
    r = CliRunner().invoke(app, ["init", "--url", "http://127.0.0.2:1", "--no-check", "--token-file", "-"],
                           input="from-stdin\n", env=env)
    assert r.exit_code == 0 and saved() == "from-stdin", r.output
    r = cli("init", "x", "--url", "http://127.0.0.2:1", "--token-file", str(tmp_path / "tok"), env=env)
    assert r.exit_code == 2 and "not both or neither" in r.output
    r = cli("init", "--url", "http://127.0.0.2:1", "--token-file", str(tmp_path / "none"), env=env)
    assert r.exit_code == 2 and "cannot read it" in r.output


def test_long_command_is_shortened():
    cmd = ["python", "x.py", *(["--flag"] * 10_000)]
    short = _short_command(cmd)
    assert len(short) < 500 and "10002 arguments" in short and "--json" in short
    assert _short_command(["true"]) == "true"


SPAWN_IN_RANK = """
import os, sys
import haiscale
seen = []
def fn(local_rank, tag):
    seen.append((local_rank, tag, os.getpid()))
haiscale.spawn(fn, args=("x",), nprocs=2)
print(seen, os.getpid())
assert seen == [(int(os.environ["LOCAL_RANK"]), "x", os.getpid())], seen
"""


def test_spawn_inside_a_launched_rank_runs_the_function_in_place():
    env = {**os.environ, "WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", SPAWN_IN_RANK], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "nprocs=2 is not used" not in r.stderr  # 2 per node: as asked
    env["LOCAL_WORLD_SIZE"] = "1"
    r = subprocess.run([sys.executable, "-c", SPAWN_IN_RANK], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "nprocs=2 is not used" in r.stderr, r.stderr


def test_spawn_in_a_rank_with_join_false_returns_no_processes(monkeypatch, capsys):
    from haiscale import spawn

    for k, v in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HAISCALE_SPAWNED", raising=False)
    seen = []
    procs = spawn(seen.append, nprocs=1, join=False, cluster="c.toml")
    assert procs == [] and seen == [0]
    for p in procs:  # what a caller written for spawned processes does: nothing to join, no crash
        p.join()
    assert "cluster=c.toml is not used" in capsys.readouterr().err


def test_follow_goes_on_after_the_apis_stream_limit_from_the_byte_it_reached(capsys):
    from haiplatform.cli.jobs import follow_chain

    log = "é-line-1\nline-2\nline-3\n".encode()
    note = b"\n[hai: the stream ends after 1 s (haiplatform.stream_max_seconds); follow the log again to go on]\n"

    class Api:  # the API's answers as the follower sees them: a stream cut by its age, then the rest
        offsets: list[int] = []

        def job(self, jid):
            done = len(self.offsets) >= 2
            return {"id": 7, "chain_id": jid, "chain_status": "finished" if done else "active",
                    "status": "succeeded" if done else "running", "ranks": []}

        def follow_log_bytes(self, jid, rank, attempt, offset):
            self.offsets.append(offset)
            if offset == 0:
                yield log[:1]  # half of 'é': the text is decoded whole
                yield log[1:12] + note
            else:
                yield log[offset:]

    final = follow_chain(Api(), 3, poll=0.01)
    assert final["status"] == "succeeded" and Api.offsets == [0, 12]
    assert capsys.readouterr().out == log[:12].decode() + note.decode() + log[12:].decode()  # nothing twice


# -- one local cluster ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jobdir():
    """A directory the jobs' Unix account can reach and write (see conftest's job_tmp_path)."""
    from deploy.local import pass_for_jobs

    pass_for_jobs(sys.executable, ROOT / "pyproject.toml")
    d = Path(tempfile.mkdtemp(prefix="fireflyer-cli-"))
    d.chmod(0o711)
    (d / "out").mkdir()
    (d / "out").chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def hc(jobdir):
    """(admin client, run(args...) -> CliRunner result) of a 4-node local cluster."""
    from deploy.local import LocalCluster
    from haiplatform.client import HaiClient

    lc = LocalCluster(cluster_file_factory(jobdir)(), jobdir / "run", ports="auto").up()
    try:
        addr, port = lc.cluster.endpoint("haiplatform.api")
        c = HaiClient(f"http://{addr}:{port}", (lc.run_dir / "hai" / "admin.token").read_text().strip())
        wait_until(lambda: len([n for n in c.nodes() if n["state"] == "up"]) == 4, timeout=30, what="4 agents up")

        def run(*args):
            return CliRunner().invoke(app, ["--url", c.url, "--token", c.token, *args])
        yield c, run
        c.close()
    finally:
        lc.down()


def test_train_ddp_example_runs_under_hai_python(hc, jobdir, monkeypatch):
    c, run = hc
    monkeypatch.chdir(ROOT)
    r = run("python", "--nodes", "2", "--follow", "examples/train_ddp.py", "--steps", "30", "--out",
            str(jobdir / "out"))
    assert r.exit_code == 0, r.output
    assert "held-out accuracy" in r.output and (jobdir / "out" / "mlp_ddp.pt").exists()


def test_follow_names_the_failed_rank_and_shows_its_last_lines(hc, jobdir, monkeypatch):
    c, run = hc
    monkeypatch.chdir(jobdir)
    script = 'if [ "$RANK" = 1 ]; then seq 1 50 | sed s/^/line-/; echo boom-on-rank-1; exit 3; fi; sleep 60'
    r = run("exec", "--nodes", "2", "--name", "fails", "--follow", "sh", "-c", script)
    assert r.exit_code == 1, r.output
    assert "failed rank(s): 1 on " in r.output and "(exit code 3)" in r.output
    assert "last lines of rank 1" in r.output and "boom-on-rank-1" in r.output and "line-50" in r.output
    assert "line-5\n" not in r.output  # only the last lines


def test_logs_whole_and_tail_and_chain_restart_ids(hc, jobdir, monkeypatch):
    c, run = hc
    monkeypatch.chdir(jobdir)
    # 600 KiB of output: more than one page of the agent's reads
    r = run("exec", "--json", "--follow", "--name", "chatty", sys.executable, "-c",
            "import sys\nfor i in range(20000): print(f'{i:08d}', 'x' * 20)\nprint('THE END')")
    assert r.exit_code == 0, r.output
    final = json.loads(r.stdout)  # --json --follow: the final job as JSON on stdout, the log on stderr
    assert final["status"] == "succeeded" and final["name"] == "chatty"
    chain = final["chain_id"]
    whole = run("logs", str(chain)).output
    assert whole.endswith("THE END\n") and whole.count("\n") == 20001
    assert run("logs", str(chain), "--tail", "2").output == f"{19999:08d} {'x' * 20}\nTHE END\n"
    assert run("logs", f"{chain}.0", "--tail", "1").output == "THE END\n"
    st = run("status", f"{chain}.0")
    assert st.exit_code == 0 and f"job {chain} chatty" in st.output and "attempt" not in st.output.split("\n")[0]
    r = run("status", f"{chain}.4")
    assert r.exit_code == 1 and f"job {chain} has no attempt {chain}.4" in r.output
    r = run("exec", "true", "--", "--nodes", "1")  # options after '--': still accepted
    assert r.exit_code == 0 and r.output.startswith("submitted job ")


def test_ctrl_c_while_following_says_the_job_goes_on(hc, jobdir):
    c, _ = hc
    p = subprocess.Popen([sys.executable, "-m", "haiplatform.cli", "--url", c.url, "--token", c.token, "exec",
                          "--name", "sleepy", "--follow", "sh", "-c", "echo started; sleep 120"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=jobdir)
    try:
        wait_until(lambda: any(j["name"] == "sleepy" and j["status"] == "running" for j in c.jobs()), timeout=30,
                   what="the job runs")
        time.sleep(0.5)  # let the follower open its stream
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, (out, err)
    (j,) = [j for j in c.jobs() if j["name"] == "sleepy"]
    assert j["status"] == "running"
    assert f"job {j['chain_id']} goes on" in err and f"hai stop {j['chain_id']}" in err and "Traceback" not in err
    c.stop(j["chain_id"])


SUSPENDABLE = """
import os, sys, time
from haiplatform import job
if os.environ["HAI_RESTART_COUNT"] != "0":
    print("resumed attempt", os.environ["HAI_RESTART_COUNT"])
    sys.exit(0)
print("started", flush=True)
while not job.receive_suspend_command():
    time.sleep(0.05)
print("suspending", flush=True)
job.go_suspend()
"""


def test_follow_goes_on_across_a_suspend_and_logs_f_keeps_the_attempt_asked(hc, jobdir):
    c, run = hc
    p = subprocess.Popen([sys.executable, "-m", "haiplatform.cli", "--url", c.url, "--token", c.token, "exec",
                          "--name", "susfollow", "--follow", sys.executable, "-c", SUSPENDABLE],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=jobdir)
    try:
        wait_until(lambda: any(j["name"] == "susfollow" for j in c.jobs()), timeout=30, what="the job")
        (chain,) = [j["chain_id"] for j in c.jobs() if j["name"] == "susfollow"]
        wait_until(lambda: "started" in c.logs(chain), timeout=30, what="the first attempt to start")
        c.suspend(chain)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, (out, err)
    assert out.index("started") < out.index("suspending") < out.index("resumed attempt 1"), out
    assert f"job {chain}.1 succeeded" in err and "did not finish" not in err
    first = run("logs", "-f", f"{chain}.0")  # the attempt asked for, not the latest
    assert first.exit_code == 0 and "suspending" in first.output and "resumed" not in first.output, first.output
    assert run("logs", "-f", "--tail", "1", f"{chain}.0").output == "suspending\n"
    assert run("logs", "-f", "-n", "1", str(chain)).output == "resumed attempt 1\n"


def test_follow_with_an_array_is_refused(hc):
    _, run = hc
    r = run("exec", "--array", "0-1", "--follow", "true")
    assert r.exit_code == 2 and "--follow with --array" in r.output, r.output


def test_slurm_features_array_dependency_hold_cancel_history_queue(hc, jobdir, monkeypatch):
    c, run = hc
    monkeypatch.chdir(jobdir)
    r = run("exec", "--array", "0-3%2", "--name", "sweep", "sh", "-c", "echo task $HAI_ARRAY_TASK_ID")
    assert r.exit_code == 0 and "submitted job array" in r.output and "4 task(s)" in r.output, r.output
    tasks = [j for j in c.jobs(limit=20) if j["name"] == "sweep"]
    assert sorted(j["array_index"] for j in tasks) == [0, 1, 2, 3]
    last = max(j["chain_id"] for j in tasks)
    r = run("exec", "--after-ok", str(last), "--name", "after-sweep", "--json", "true")
    dep = json.loads(r.stdout)
    assert dep["after_ok"] == [last]
    assert c.wait(dep["chain_id"], timeout=60)["status"] == "succeeded"
    assert run("logs", str(last)).output == "task 3\n"
    held = json.loads(run("exec", "--hold", "--name", "held", "--json", "true").stdout)
    q = json.loads(run("queue", "--json").stdout)
    assert any(x["chain_id"] == held["chain_id"] and "held" in x["reason"] for x in q)
    assert run("release", str(held["chain_id"])).exit_code == 0
    assert c.wait(held["chain_id"], timeout=60)["status"] == "succeeded"
    for _ in range(2):
        run("exec", "--name", "doomed", "--hold", "true")
    r = run("cancel", "--name", "doomed", "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["canceled"]) == 2
    hist = json.loads(run("history", "--name", "sweep", "--since", "1h", "--json").stdout)
    assert len(hist["jobs"]) == 4 and {h["status"] for h in hist["jobs"]} == {"succeeded"}
    text = run("history", "--since", "1h").output
    assert "sweep" in text and "elapsed" in text and "restarts" in text
    r = run("resubmit", str(last), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["chain_id"] != last


def test_admin_users_groups_quotas_events(hc):
    c, run = hc
    tok = json.loads(run("admin", "user", "add", "bob", "--group", "nlp", "--json").stdout)["token"]
    bob = ["--url", c.url, "--token", tok]
    assert CliRunner().invoke(app, [*bob, "whoami"]).exit_code == 0
    assert run("admin", "user", "disable", "bob").exit_code == 0
    r = CliRunner().invoke(app, [*bob, "whoami", "--json"])
    assert r.exit_code == 1 and "disabled" in json.loads(r.stdout)["error"] and json.loads(r.stdout)["status"] == 401
    assert run("admin", "user", "enable", "bob").exit_code == 0
    new = json.loads(run("admin", "user", "token", "bob", "--json").stdout)["token"]
    assert CliRunner().invoke(app, [*bob, "whoami"]).exit_code == 1
    assert CliRunner().invoke(app, ["--url", c.url, "--token", new, "whoami"]).exit_code == 0
    assert "nlp" in run("admin", "group", "list").output
    assert run("admin", "quota", "set", "group:nlp", "2").exit_code == 0
    assert run("admin", "quota", "delete", "group:nlp").exit_code == 0
    assert "group:nlp" not in run("admin", "quota", "list").output
    assert run("admin", "group", "set", "bob").exit_code == 0
    assert run("admin", "group", "delete", "nlp").exit_code == 0
    assert run("admin", "user", "remove", "bob").exit_code == 0
    assert "bob" not in run("admin", "user", "list").output
    r = run("events", "--limit", "5", "--json")
    evs = json.loads(r.stdout)
    assert r.exit_code == 0 and 1 < len(evs) <= 5
    text = run("events", "--limit", "5").output.splitlines()  # as a log reads: the newest last
    assert evs[0]["message"] in text[-1] and evs[-1]["message"] in text[0], (evs, text)
