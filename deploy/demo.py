"""`make demo`: the stack's showcase on one machine.

Brings up the local cluster (deploy/clusters/local.toml: 4 emulated nodes on 127.0.0.x, 2 zones;
fs3 cluster manager, metadata service and 3 storage servers; HAI-Platform API, scheduler and an agent per node),
then runs the end-to-end path that exists so far, and stops everything:

1. the cluster comes up: every service, each node on its own loopback address;
2. the link probe measures bandwidth and latency between the nodes;
3. fs3: the routing table (3-replica chains), the training data written as FFRecord files, and
   the namespace mounted with FUSE (when this machine allows it; else the job uses the client);
4. a researcher is added and submits a 2-node x 2-rank training job with ``hai python``; it trains
   with haiscale DDP on hfreduce, reads its data from the fs3 mount and checkpoints through
   fs3.checkpoint (in the background); ``fs3 ls -l`` lists the checkpoint;
5. time-sharing: the same training, never interrupted, runs beside it as the reference; then bob
   submits a 3-node job at priority ``high`` and the scheduler preempts alice's job (no ``hai
   suspend``): its ranks agree on a step, checkpoint and exit; it waits in the queue (``hai list``
   shows why), resumes from the fs3 checkpoint once bob's job is done, and ends with parameters
   identical to the reference's;
6. large models: a DeepSeekMoE language model submitted with ``hai python`` on 2 nodes, its routed
   experts split over them (expert parallelism over hfreduce.all_to_all, Loss-Free Balancing);
7. the researcher's day: a sweep submitted as a job array (at most 2 tasks at once), a job that
   waits for all of it to succeed (``--after-ok``), ``hai queue`` and ``hai history``, and the web
   dashboard's address;
8. operations: every node validated itself before taking jobs (``hai nodes``), one validation on
   request (``hai validate``), and Prometheus metrics from a node's exporter;
9. hardening: the job ran as alice's Unix account (not root), a stranger's forged chain forward to
   a storage server is refused at connect, another user's job can neither open alice's checkpoint
   for writing nor write its chunks straight to storage, and a storage server killed with SIGKILL
   is restarted by the launcher;
10. everything stops, and nothing is left behind.

    python -m deploy.demo [--cluster FILE] [--keep-run-dir]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from deploy.local import LocalCluster, pass_for_jobs, render_status, wait_until
from network.probe import probe_matrix, render

ROOT = Path(__file__).resolve().parent.parent
con = Console()


class DemoError(RuntimeError):
    pass


def step(title: str) -> None:
    con.rule(f"[bold cyan]{title}")


class Hai:
    """Runs the `hai` CLI against the demo's cluster, as a researcher would."""

    def __init__(self, run_dir: Path, token: str | None = None) -> None:
        self.env = {**os.environ, "HAI_CLUSTER": str(run_dir / "cluster.toml"), "HAI_RUN_DIR": str(run_dir),
                    "COLUMNS": "120"}
        if token:
            self.env["HAI_TOKEN"] = token

    def __call__(self, *args: str, show: bool = True, check: bool = True, timeout: float = 120) -> str:
        cmd = [sys.executable, "-m", "haiplatform.cli", *args]
        if show:
            con.print(f"[dim]$ hai {' '.join(args)}[/]")
        r = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=ROOT)
        if show and r.stdout.strip() and "--json" not in args:
            con.print(r.stdout.rstrip(), markup=False, highlight=False, soft_wrap=True)
        if check and r.returncode != 0:
            raise DemoError(f"hai {' '.join(args)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def json(self, *args: str, **kw) -> dict | list:
        return json.loads(self(*args, "--json", show=False, **kw))


def wait_for(what: str, fn, timeout: float, poll: float = 0.25):
    return wait_until(fn, timeout, what, poll, error=DemoError)


class Fs3Mount:
    """The fs3 namespace mounted at RUN_DIR/mnt with ``fs3 mount`` (FUSE), as an admin mounts it on
    every node; None of it when FUSE is not usable here (the job then reads with the Python client)."""

    def __init__(self, lc: LocalCluster, run_dir: Path) -> None:
        from fs3.fuse import unavailable

        self.lc, self.path = lc, run_dir / "mnt"
        self.why_not = unavailable()
        self.mounted = False

    def fs3(self, *args: str, check: bool = True, show: bool = True) -> str:
        cmd = [sys.executable, "-m", "fs3.cli", *args]
        if show:
            con.print(f"[dim]$ fs3 {' '.join(args)}[/]")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env={**os.environ, "FIREFLYER_CLUSTER": str(self.lc.cluster_file), "COLUMNS": "120"})
        if show and r.stdout.strip():
            con.print(r.stdout.rstrip(), markup=False, highlight=False, soft_wrap=True)
        if check and r.returncode != 0:
            raise DemoError(f"fs3 {' '.join(args)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def mount(self) -> None:
        if self.why_not:
            con.print(f"[yellow]FUSE is not usable here ({self.why_not}): the job reads its data with the "
                      "Python client instead of the mount[/]")
            return
        self.path.mkdir()
        self.fs3("mount", str(self.path))
        self.mounted = True

    def umount(self) -> None:
        if self.mounted:
            self.fs3("umount", str(self.path), check=False)
            self.mounted = False


def fs3_steps(lc: LocalCluster, mnt: Fs3Mount) -> None:
    from examples.demo_train import prepare_fs3
    from fs3 import FileSystem

    with FileSystem(lc.cluster) as fs:
        r = fs.chunks.refresh_routing()
        con.print(f"routing version {r.version}: {len(r.chain_ids())} chains, chunk size {r.chunk_size >> 10} KiB")
        mnt.fs3("chains", "--cluster", str(lc.cluster_file))
        t0 = time.perf_counter()
        made = prepare_fs3(fs)  # the FFRecord dataset and the checkpoint directory
        dt = time.perf_counter() - t0
    con.print(f"training data: {made['samples']} samples in {made['files']} FFRecord files "
              f"({made['bytes'] / 1e6:.2f} MB, 3 replicas) written to {made['dataset']} in {dt * 1000:.0f} ms")
    mnt.mount()
    if mnt.mounted:
        listing = sorted(os.listdir(mnt.path / made["dataset"].lstrip("/")))
        con.print(f"[dim]$ ls {mnt.path}{made['dataset']}[/]\n{'  '.join(listing)}")
        con.print(f"fs3 is mounted at {mnt.path}: the job reads its dataset through the mount")
    mnt.fs3("ls", "-l", made["dataset"])


def training_steps(lc: LocalCluster, run_dir: Path, mnt: Fs3Mount) -> tuple[str, str]:
    """Steps 4 and 5; returns the training job's log and alice's token."""
    import threading

    admin = Hai(run_dir)
    admin("nodes")
    user = admin.json("admin", "user", "add", "alice", "--group", "vision")
    con.print("added researcher alice (group vision); she submits with her own token")
    hai = Hai(run_dir, token=user["token"])
    hai("whoami")
    via_mount = ["--mount", str(mnt.path)] if mnt.mounted else []
    train = ["examples/demo_train.py", "--steps", "60", "--ckpt-every", "10", *via_mount]
    job = hai.json("python", *train, "--step-sleep", "0.3",
                   "--", "--nodes", "2", "--procs-per-node", "2", "--name", "demo-train")
    jid = job["id"]
    con.print(f"submitted job {jid}: 2 nodes x 2 ranks, haiscale DDP on hfreduce, data and checkpoints on fs3")
    # the same training, unpaced and never interrupted, on the other two nodes: the result to match
    ref = hai.json("python", *train, "--step-sleep", "0",
                   "--", "--nodes", "2", "--procs-per-node", "2", "--name", "demo-reference")["id"]
    con.print(f"submitted job {ref}: the same training without pauses, never interrupted (the reference result)")

    def follow(tag: str, seen: list[str]) -> subprocess.Popen:
        """`hai logs -f JOB` (rank 0 of the chain's current attempt), echoed live."""
        con.print(f"[dim]$ hai logs -f {jid}[/]")
        p = subprocess.Popen([sys.executable, "-m", "haiplatform.cli", "logs", "-f", str(jid)], env=hai.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)

        def pump() -> None:
            for line in p.stdout:
                seen.append(line)
                con.print(f"[dim]{escape(tag)}[/] {escape(line.rstrip())}", highlight=False)
        threading.Thread(target=pump, daemon=True).start()
        return p

    wait_for("the job to start", lambda: hai.json("status", str(jid))["status"] == "running", 60)
    st = hai.json("status", str(jid))
    con.print(f"job {jid} is running on " + ", ".join(sorted({r['node'] for r in st.get('ranks', [])})))
    first: list[str] = []
    p1 = follow("[attempt 1]", first)
    try:
        wait_for("the reference run", lambda: hai.json("status", str(ref))["chain_status"] == "finished", 120,
                 poll=0.5)
        want = re.search(r"params sha256 (\w+)", hai("logs", str(ref), show=False))
        if hai.json("status", str(ref))["status"] != "succeeded" or not want:
            raise DemoError(f"the reference job {ref} did not finish")
        con.print(f"reference job {ref} finished: params sha256 {want.group(1)[:16]}...")
        wait_for("a checkpoint", lambda: any("checkpoint saved" in x for x in first), 120)
        step("5. time-sharing: a higher-priority job of another user preempts the training job")
        bob = admin.json("admin", "user", "add", "bob", "--group", "nlp")
        bob_hai = Hai(run_dir, token=bob["token"])
        urgent = bob_hai.json("exec", "sh", "-c", 'echo "urgent evaluation: rank $RANK on $HAI_NODE_NAME"; sleep 3',
                              "--", "--nodes", "3", "--priority", "high", "--name", "urgent-eval")["id"]
        con.print(f"bob submitted job {urgent}: 3 nodes at priority high; the cluster has 2 free, so the scheduler "
                  f"suspends alice's job {jid} (normal) without anyone typing `hai suspend`")
        p1.wait(90)
    finally:
        p1.kill()
    if not any("suspend requested" in x for x in first):
        raise DemoError("the first attempt did not checkpoint and exit on the preemption")
    wait_for("the job to be re-queued", lambda: len(hai.json("status", str(jid)).get("attempts", [])) >= 2, 60)
    admin("list", "--all", "--limit", "4")   # alice's next attempt waits in the queue: POS and why
    wait_for(f"bob's job {urgent} to finish", lambda: bob_hai.json("status", str(urgent))["chain_status"] == "finished",
             120, poll=0.5)
    if bob_hai.json("status", str(urgent))["status"] != "succeeded":
        raise DemoError(f"bob's job {urgent} did not succeed")
    second: list[str] = []
    p2 = follow("[attempt 2]", second)
    try:
        p2.wait(240)
    finally:
        p2.kill()
    final = wait_for("the job to finish", lambda: (lambda j: j if j["chain_status"] == "finished" else None)(
        hai.json("status", str(jid))), 60, poll=0.5)
    hai("status", str(jid))
    text = "".join(second)
    if final["status"] != "succeeded":
        raise DemoError(f"job {jid} ended {final['status']}")
    preempted = [a for a in final.get("attempts", []) if "preempted by job" in (a.get("reason") or "")]
    if not preempted:
        raise DemoError(f"job {jid}'s history does not show the preemption: {final.get('attempts')}")
    m = re.search(r"resumed from the fs3 checkpoint at step (\d+)", text)
    if not m or int(m.group(1)) == 0:
        raise DemoError("the job did not resume from its checkpoint after the preemption")
    if "done: 60 steps" not in text:
        raise DemoError("the resumed attempt did not finish the training")
    got = re.search(r"params sha256 (\w+)", text)
    if not got or got.group(1) != want.group(1):
        raise DemoError(f"the preempted job's parameters differ from the uninterrupted run's "
                        f"({got.group(1) if got else None} against {want.group(1)})")
    con.print(f"[green]preempted by job {urgent} at step {m.group(1)}, resumed from fs3 in attempt "
              f"{len(final.get('attempts', []))} once it finished, all 60 steps done: parameters identical to the "
              f"uninterrupted run (sha256 {got.group(1)[:16]}...)[/]")
    mnt.fs3("ls", "-l", "/demo/ckpt")
    return "".join(first) + text, user["token"]


def large_model_step(run_dir: Path, token: str) -> None:
    """A DeepSeekMoE language model whose routed experts are split over two nodes: tokens travel to
    their experts' node and back through hfreduce.all_to_all (real TCP between the emulated nodes),
    balanced by Loss-Free Balancing instead of an auxiliary loss."""
    hai = Hai(run_dir, token=token)
    job = hai.json("python", "examples/moe_lm.py", "--steps", "60",
                   "--", "--nodes", "2", "--procs-per-node", "1", "--name", "moe-lm")
    jid = job["id"]
    con.print(f"submitted job {jid}: a DeepSeekMoE LM, 16 fine-grained experts split over 2 nodes (expert "
              "parallelism over hfreduce.all_to_all), Loss-Free Balancing")
    final = wait_for(f"job {jid} to finish", lambda: (lambda j: j if j["chain_status"] == "finished" else None)(
        hai.json("status", str(jid))), 300, poll=0.5)
    log = hai("logs", str(jid), show=False)
    for line in log.splitlines():
        if line.startswith(("step", "validation")):
            con.print(f"[dim]{escape('[moe-lm]')}[/] {escape(line)}", highlight=False)
    if final["status"] != "succeeded" or "validation loss" not in log:
        raise DemoError(f"the MoE job {jid} ended {final['status']}:\n{log[-2000:]}")
    con.print("[green]the experts lived on two nodes, every token reached its experts and came back[/]")


def researchers_day_step(lc: LocalCluster, run_dir: Path, token: str) -> None:
    """A sweep as a job array (at most 2 tasks at once), a job that waits for the whole sweep to
    succeed, ``hai queue`` showing why each waits, ``hai history`` once they ended, and the web
    dashboard's address."""
    hai = Hai(run_dir, token=token)
    sweep = hai.json("exec", "--json", "--array", "0-3%2", "--name", "sweep", "--procs-per-node", "1",
                     "sh", "-c", "sleep 2; echo lr=0.00$((HAI_ARRAY_TASK_ID + 1)) loss=$((9 - HAI_ARRAY_TASK_ID))")
    tasks = [str(t) for t in sweep["array_tasks"]]
    con.print(f"submitted the sweep as job array {sweep['array_id']}: tasks {', '.join(tasks)} "
              "(Slurm's --array 0-3%2: at most 2 run at once, each sees HAI_ARRAY_TASK_ID)")
    best = hai.json("exec", "--json", "--after-ok", str(sweep["array_id"]), "--name", "pick-best", "--procs-per-node", "1",
                    "echo", "all 4 sweep tasks succeeded: pick the best")
    con.print(f"submitted job {best['id']}: starts only once every task of array {sweep['array_id']} succeeded "
              "(--after-ok on the array's id)")
    hai("queue")
    wait_for(f"job {best['id']} to finish", lambda: (lambda j: j if j["chain_status"] == "finished" else None)(
        hai.json("status", str(best["id"]))), 120, poll=0.5)
    hai("history", "--since", "10m", "--name", "sweep")
    hai("logs", tasks[-1])
    hai("history", "--since", "10m", "--name", "pick-best")
    addr, port = lc.cluster.endpoint("haiplatform.api")
    url = f"http://{addr}:{port}/ui/"
    with urllib.request.urlopen(url, timeout=10) as r:
        page = r.read().decode(errors="replace")
    if r.status != 200 or "<form" not in page:
        raise DemoError(f"the dashboard at {url} did not serve its login page ({r.status})")
    con.print(f"[green]the web dashboard serves {url}[/]: log in with your token (queue, history, logs, nodes)")


def operations_step(lc: LocalCluster, run_dir: Path) -> None:
    """The admin's view: every node validated itself at start (hai nodes), one more validation on
    request, and the Prometheus metrics of the scheduler through n0's exporter."""
    hai = Hai(run_dir)
    hai("validate", "--node", "n1", "--wait", "60")
    hai("nodes")
    from network import load_cluster_key
    from network.metrics import metrics_token

    addr, port = lc.cluster.endpoint("network.metrics", "n0")
    req = urllib.request.Request(f"http://{addr}:{port}/metrics",
                                 headers={"Authorization": f"Bearer {metrics_token(load_cluster_key(lc.cluster))}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    con.print(f"[dim]$ curl -H 'Authorization: Bearer ...' http://{addr}:{port}/metrics | grep ...[/]")
    wanted = ("fireflyer_hai_job_starts_total", "fireflyer_hai_preemptions_total", "fireflyer_hai_nodes",
              "fireflyer_fs3_chains")
    shown = [ln for ln in text.splitlines() if ln.startswith(wanted)][:12]
    for ln in shown:
        con.print(ln, markup=False, highlight=False, soft_wrap=True)
    if not shown:
        raise DemoError("the exporter on n0 served no scheduler metrics")
    con.print("[green]every service exports Prometheus metrics (docs/metrics.md; Grafana: deploy/grafana/)[/]")


def fs3_isolation(lc: LocalCluster) -> None:
    """Another user's job (bob's credential, as the agent would derive it) may read alice's
    checkpoint (mode 0644) but not overwrite it, and storage refuses its direct chunk writes."""
    from fs3 import FileSystem
    from fs3.client import file_chunk_id
    from fs3.errors import CapabilityDenied
    from network import derive

    ckpt = "/demo/ckpt/chain-1"
    bob = derive(lc.credential, "job:999/uid=12345/gid=12345", time.time() + 600)
    with FileSystem(lc.cluster, credential=bob) as fs:
        a = fs.meta.stat(path=ckpt)
        try:
            fs.open(ckpt, "r+b").close()
        except PermissionError as exc:
            con.print(f"bob's job opening alice's checkpoint for writing: [green]refused[/] ({exc.strerror})")
        else:
            raise DemoError("another user's job could open alice's checkpoint for writing")
        chain = a.layout["chains"][0]
        try:
            fs.chunks.write(chain, file_chunk_id(a.ino, 0), b"overwritten")
        except CapabilityDenied:
            con.print(f"bob's job writing chunk 0 of inode {a.ino} straight to storage: [green]refused[/] "
                      "(no capability for that file)")
        else:
            raise DemoError("storage accepted a chunk write without a capability")


def hardening_steps(lc: LocalCluster, run_dir: Path, job_log: str) -> None:
    """What issue #14 added, shown: the job ran as its user's account, a stranger's forged chain
    forward is refused at connect, and a crashed storage server comes back by itself."""
    import signal

    from network import AuthError, RpcClient, new_cluster_key

    m = re.search(r"running as (\S+) \(uid (\d+)\)", job_log)
    if not m:
        raise DemoError("the job did not say which account it ran as")
    con.print(f"the job ran as [bold]{m.group(1)}[/] (uid {m.group(2)}), alice's Unix account: it could not "
              "read the platform's tokens, keys or database")
    if os.geteuid() == 0 and m.group(2) == "0":
        raise DemoError("the job ran as root")
    host, port = lc.cluster.endpoint("fs3.storage", "n3")
    try:
        with RpcClient(host, port, credential=new_cluster_key(), timeout=5, connect_timeout=5) as c:
            c.call("storage.write", {"fwd": True, "chain": 1, "chunk": 1})
    except AuthError as exc:
        con.print(f"a stranger's forged chain forward to fs3.storage@n3: [green]refused[/] ({exc})")
    else:
        raise DemoError("a forged storage.write from a stranger was accepted")
    fs3_isolation(lc)
    victim = "fs3.storage@n2"
    pid = lc.info[victim].pid
    os.kill(pid, signal.SIGKILL)
    con.print(f"$ kill -9 {pid}   # {victim} crashes")

    def restarted() -> bool:  # the launcher's monitor thread keeps lc.info current
        i = lc.info[victim]
        return i.pid != pid and i.state == "healthy" and i.restarts >= 1

    wait_for(f"{victim} restarted and healthy", restarted, 60)
    render_status({"cluster": lc.cluster.name, "state": "up", "run_dir": str(run_dir),
                   "services": [vars(i) for i in lc.status()]})
    con.print(f"[green]{victim} was restarted by the launcher (back-off, as systemd's Restart=on-failure)[/]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", default=str(ROOT / "deploy" / "clusters" / "local.toml"))
    ap.add_argument("--keep-run-dir", action="store_true", help="keep logs and state after the demo")
    ap.add_argument("--netns", action="store_true", help="run the cluster on network namespaces (make demo NETNS=1)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    if args.netns:  # said plainly, before anything starts, where this machine cannot
        from deploy.netns import unavailable

        why = unavailable()
        if why:
            con.print(f"[red]the demo cannot run on network namespaces here: {why}[/] (run 'make demo' without "
                      "NETNS=1 for the loopback cluster)")
            return 2
        con.print("[bold]on network namespaces:[/] every node has its own network stack and address, joined by "
                  "bridges for the leaves and the zones' spines, links shaped to the description's rates")
    run_dir = Path(tempfile.mkdtemp(prefix="fireflyer-demo-"))
    t_start = time.monotonic()
    # the job runs as the researcher's account (hai-NAME): it must reach this Python and the demo's code
    for d in pass_for_jobs(sys.executable, ROOT / "examples" / "demo_train.py"):
        con.print(f"[dim]jobs run as their users' accounts: gave them passage (o+x, not listing) through {d}, "
                  "on the way to this Python and the demo's code[/]")
    lc = LocalCluster(args.cluster, run_dir, ports="auto", health_timeout=60, netns=args.netns)
    mnt = Fs3Mount(lc, run_dir)
    if args.netns and not mnt.why_not:  # ip netns exec gives each service a mount namespace of its own
        mnt.why_not = ("the services and their jobs run in their nodes' namespaces, which do not see a mount "
                       "made here once they run")
    ok = False
    try:
        step("1. bring up the local cluster")
        lc.up()
        render_status({"cluster": lc.cluster.name, "state": "up", "run_dir": str(run_dir),
                       "services": [vars(i) for i in lc.status()]})

        step("2. link probe: bandwidth and latency between the nodes")
        names = lc.cluster.ordered()
        res = probe_matrix(lc.cluster, names, size=16 << 20, reps=3, pings=20, spawn="never")
        render(res, names, con)
        if any(r.error for r in res):
            raise DemoError("some links failed")

        step("3. fs3: chains, the training dataset (FFRecord) and the mount")
        fs3_steps(lc, mnt)

        step("4. a researcher submits a training job with hai")
        job_log, alice = training_steps(lc, run_dir, mnt)

        step("6. large models: DeepSeekMoE with its experts on two nodes")
        large_model_step(run_dir, alice)
        step("7. the researcher's day: a sweep as a job array, a dependent job, the queue, history, the dashboard")
        researchers_day_step(lc, run_dir, alice)
        step("8. operations: the node validator and Prometheus metrics")
        operations_step(lc, run_dir)
        step("9. hardening: jobs run as their users, strangers are refused, crashed services come back")
        hardening_steps(lc, run_dir, job_log)
        ok = True
    except Exception as exc:  # noqa: BLE001 - the demo reports and exits non-zero
        con.print(f"[red]demo failed: {type(exc).__name__}: {exc}[/]")
        con.print(f"logs: {run_dir / 'logs'}")
    finally:
        step("10. stop everything")
        mnt.umount()
        lc.down()
        left = [i.key for i in lc.info.values() if i.state != "stopped"]
        con.print("all services stopped" if not left else f"[red]still running: {left}[/]")
        ok = ok and not left
        if args.keep_run_dir or not ok:
            con.print(f"run dir kept: {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    con.print(f"[bold {'green' if ok else 'red'}]demo {'passed' if ok else 'FAILED'}[/] "
              f"in {time.monotonic() - t_start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
