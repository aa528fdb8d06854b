"""The pure policy on in-memory snapshots: no database, no processes."""

from __future__ import annotations

from dataclasses import replace

from haiplatform.db import JobStatus, RankStatus, StopCode
from haiplatform.policy import (
    PROFILES,
    CancelJob,
    DrainNode,
    FinishJob,
    JobView,
    MarkNode,
    MarkRanksLost,
    MarkRunning,
    NodeView,
    PolicyConfig,
    QuotaView,
    RankView,
    SetPriority,
    SetReason,
    Snapshot,
    StartJob,
    StopJob,
    decide,
    never_fits,
    plan,
    queue_position,
)
from haiplatform.states import AUTO

NOW = 1000.0


def nodes(n=4, **kw):
    # 2 zones x 1 leaf, like deploy/clusters/local.toml
    return tuple(NodeView(f"n{i}", zone="zone-a" if i < n // 2 else "zone-b",
                          leaf="a-leaf0" if i < n // 2 else "b-leaf0", last_seen=NOW, **kw) for i in range(n))


def starts(ds):
    return {d.job_id: d.nodes for d in ds if isinstance(d, StartJob)}


def stops(ds):
    return {d.job_id: d.reason for d in ds if isinstance(d, StopJob)}


def run(i, user, on, priority=10, **kw):
    """A running attempt on nodes ``on``, one rank per node."""
    kw.setdefault("started_at", NOW - 3600)
    return JobView(i, user, len(on), priority=priority, status=JobStatus.RUNNING, assigned_nodes=tuple(on),
                   ranks=tuple(RankView(k, x, RankStatus.RUNNING) for k, x in enumerate(on)), **kw)


def test_priority_first_then_first_submission():
    jobs = (JobView(1, "alice", 1, priority=10), JobView(2, "bob", 1, priority=30),
            JobView(3, "carol", 1, priority=10), JobView(4, "dave", 1, priority=10))
    ds = decide(Snapshot(NOW, jobs, nodes(2)))
    assert set(starts(ds)) == {2, 1}  # the high-priority job and the oldest normal one
    reasons = {d.job_id: d.reason for d in ds if isinstance(d, SetReason)}
    assert reasons == {3: "waiting for nodes: needs 1, 0 free", 4: "waiting for nodes: needs 1, 0 free"}


def test_resumed_attempt_keeps_its_place():
    # attempt 9 resumes chain 2 (first_id 2): it goes before job 5 submitted later
    jobs = (JobView(5, "alice", 1), JobView(9, "bob", 1, first_id=2))
    assert set(starts(decide(Snapshot(NOW, jobs, nodes(1))))) == {9}


def test_whole_nodes_packed_by_leaf_and_ranks_laid_out():
    ds = decide(Snapshot(NOW, (JobView(1, "a", 2, procs_per_node=3),), nodes(4)))
    (d,) = [d for d in ds if isinstance(d, StartJob)]
    assert d.nodes in (("n0", "n1"), ("n2", "n3"))   # one leaf, never split across zones
    assert [r[0] for r in d.ranks] == list(range(6))
    assert [(r[1], r[2]) for r in d.ranks[:4]] == [(d.nodes[0], 0), (d.nodes[0], 1), (d.nodes[0], 2), (d.nodes[1], 0)]


def test_score_prefers_tightest_leaf():
    ns = tuple(NodeView(f"n{i}", "z", f"l{i // 2}", last_seen=NOW) for i in range(4))
    busy = run(1, "x", ("n1",))                  # leaf l0 keeps one free node
    assert starts(decide(Snapshot(NOW, (busy, JobView(2, "a", 1)), ns))) == {2: ("n0",)}  # l1 stays whole
    assert starts(decide(Snapshot(NOW, (busy, JobView(2, "a", 2), JobView(3, "b", 1)), ns))) == {
        2: ("n2", "n3"), 3: ("n0",)}
    assert starts(decide(Snapshot(NOW, (busy, JobView(2, "a", 4)), ns))) == {}


def test_held_drained_and_lost_nodes_are_not_used():
    running = JobView(1, "a", 1, status=JobStatus.RUNNING, assigned_nodes=("n0",),
                      ranks=(RankView(0, "n0", RankStatus.RUNNING),))
    ns = (NodeView("n0", last_seen=NOW), NodeView("n1", drained=True, last_seen=NOW),
          NodeView("n2", state="lost", last_seen=NOW), NodeView("n3", last_seen=NOW))
    ds = decide(Snapshot(NOW, (running, JobView(2, "b", 1), JobView(3, "c", 1)), ns))
    assert starts(ds) == {2: ("n3",)}


def test_reference_fifo_strict_order_and_seeded_random_nodes():
    jobs = (JobView(1, "a", 4), JobView(2, "b", 1))
    ds, _ = plan(Snapshot(NOW, jobs, nodes(3)), profile=PROFILES["reference-fifo"])
    assert starts(ds) == {}   # the blocked head holds back everything behind it (no backfill)
    assert {d.job_id for d in ds if isinstance(d, SetReason)} == {1, 2}
    # random free nodes (no topology), the same for the same seed
    many = tuple(NodeView(f"n{i:02d}", "z", "l", last_seen=NOW) for i in range(20))
    picks = {starts(plan(Snapshot(NOW, (JobView(1, "a", 3),), many), PolicyConfig(seed=s),
                         PROFILES["reference-fifo"])[0])[1] for s in range(5)}
    assert len(picks) > 1
    again = plan(Snapshot(NOW, (JobView(1, "a", 3),), many), PolicyConfig(seed=3), PROFILES["reference-fifo"])[0]
    assert starts(again)[1] in picks


def test_reference_fifo_suspends_running_jobs_outside_the_fitting_prefix():
    """No minimum run time: a job that started a second ago is suspended for a higher-priority one."""
    low = run(1, "a", ("n0", "n1"), started_at=NOW - 1)
    ds, _ = plan(Snapshot(NOW, (low, JobView(2, "b", 1, priority=30)), nodes(2)), profile=PROFILES["reference-fifo"])
    assert stops(ds) == {1: "preempted by job 2 (user b, priority 30)"} and starts(ds) == {}


def test_a_profile_composes_the_queue_plugins():
    """plan() runs the profile it is given: without StrictOrder a small job backfills behind a blocked
    one, and a filter's unschedulable reason is the attempt's reason without blocking the queue."""
    from haiplatform.policy import DEFAULT_PROFILE, Code, Profile, QuotaFilter, Status

    class NoBob:
        name = "no_bob"

        def filter(self, job, cs):
            return Status(Code.UNSCHEDULABLE, "bob may not run") if job.user == "bob" else Status()

    jobs = (JobView(1, "a", 4), JobView(2, "bob", 1), JobView(3, "c", 1))
    backfill = Profile("backfill", DEFAULT_PROFILE.queue_sort, (QuotaFilter(), NoBob()), DEFAULT_PROFILE.score)
    ds, free = plan(Snapshot(NOW, jobs, nodes(3)), profile=backfill)
    assert set(starts(ds)) == {3} and free == 2
    assert {d.job_id: d.reason for d in ds if isinstance(d, SetReason)} == {1: "waiting for nodes: needs 4, 3 free",
                                                                          2: "bob may not run"}
    assert starts(plan(Snapshot(NOW, jobs, nodes(3)), profile=PROFILES["reference-fifo"])[0]) == {}
    full = (run(9, "x", ("n0", "n1", "n2")), JobView(3, "c", 1, priority=50))   # no preemption plugin
    assert reasons(plan(Snapshot(NOW, full, nodes(3)), profile=backfill)[0]) == {3: "waiting for nodes: needs 1, 0 free"}


def test_quota_per_user_and_priority():
    q = (QuotaView("user:alice", 1, priority=10),)
    running = JobView(1, "alice", 1, status=JobStatus.RUNNING, assigned_nodes=("n0",),
                      ranks=(RankView(0, "n0", RankStatus.RUNNING),))
    jobs = (running, JobView(2, "alice", 1), JobView(3, "alice", 1, priority=30), JobView(4, "bob", 1))
    ds = decide(Snapshot(NOW, jobs, nodes(4), q))
    assert set(starts(ds)) == {3, 4}   # quota-blocked job 2 does not block others
    reasons = {d.job_id: d.reason for d in ds if isinstance(d, SetReason)}
    assert reasons[2].startswith("out_of_quota: user:alice at priority 10 uses 1 of 1")


def test_group_quota_and_quota_exceeded():
    q = (QuotaView("group:vision", 2),)
    jobs = (JobView(1, "a", 3, group="vision"), JobView(2, "b", 1, group="vision"), JobView(3, "c", 1, group="vision"),
            JobView(4, "d", 1, group="vision"))
    ds = decide(Snapshot(NOW, jobs, nodes(4), q))
    assert set(starts(ds)) == {2, 3}
    reasons = {d.job_id: d.reason for d in ds if isinstance(d, SetReason)}
    assert reasons[1].startswith("quota_exceeded: asks 3 nodes")
    assert reasons[4].startswith("out_of_quota")


def test_unchanged_reason_is_not_rewritten():
    ds = decide(Snapshot(NOW, (JobView(1, "a", 9, reason="waiting for nodes: needs 9, 4 free"),), nodes(4)))
    assert ds == []


def test_all_ranks_running_marks_running_and_success_finishes():
    ranks = (RankView(0, "n0", RankStatus.RUNNING), RankView(1, "n1", RankStatus.RUNNING))
    j = JobView(1, "a", 2, status=JobStatus.SCHEDULED, assigned_nodes=("n0", "n1"), ranks=ranks)
    assert MarkRunning(1) in decide(Snapshot(NOW, (j,), nodes(4)))
    done = (RankView(0, "n0", RankStatus.SUCCEEDED, exit_code=0), RankView(1, "n1", RankStatus.SUCCEEDED, exit_code=0))
    j = JobView(1, "a", 2, status=JobStatus.RUNNING, assigned_nodes=("n0", "n1"), ranks=done)
    (f,) = [d for d in decide(Snapshot(NOW, (j,), nodes(4))) if isinstance(d, FinishJob)]
    assert (f.status, f.exit_code, f.requeue) == (JobStatus.SUCCEEDED, 0, False)


def test_failed_rank_stops_the_others_then_job_fails_with_its_exit_code():
    ranks = (RankView(0, "n0", RankStatus.RUNNING), RankView(1, "n1", RankStatus.FAILED, exit_code=3))
    j = JobView(1, "a", 2, status=JobStatus.RUNNING, assigned_nodes=("n0", "n1"), ranks=ranks)
    ds = decide(Snapshot(NOW, (j, JobView(2, "b", 2)), nodes(4)))
    (s,) = [d for d in ds if isinstance(d, StopJob)]
    assert s.code == StopCode.FAILED and "rank 1 failed (exit code 3)" in s.reason
    assert starts(ds) == {2: ("n2", "n3")}   # the stopping job still holds n0, n1
    ranks = (RankView(0, "n0", RankStatus.KILLED, exit_code=-15), RankView(1, "n1", RankStatus.FAILED, exit_code=3))
    j = JobView(1, "a", 2, status=JobStatus.STOPPING, stop_code=StopCode.FAILED, assigned_nodes=("n0", "n1"),
                ranks=ranks)
    (f,) = [d for d in decide(Snapshot(NOW, (j,), nodes(4))) if isinstance(d, FinishJob)]
    assert f.status == JobStatus.FAILED and f.exit_code == 3  # rank 1's own failure, not the SIGTERM


def test_missed_heartbeats_lose_the_node_drain_it_and_requeue_its_job():
    ns = (NodeView("n0", last_seen=NOW), NodeView("n1", last_seen=NOW - 30))
    ranks = (RankView(0, "n0", RankStatus.RUNNING), RankView(1, "n1", RankStatus.RUNNING))
    j = JobView(1, "a", 2, status=JobStatus.RUNNING, assigned_nodes=("n0", "n1"), ranks=ranks, restart_count=3)
    ds = decide(Snapshot(NOW, (j,), ns), PolicyConfig(heartbeat_timeout=10))
    assert MarkNode("n1", "lost", ds[0].reason) in ds
    assert MarkRanksLost(1, "n1") in ds and DrainNode("n1", "node n1 lost under job 1") in ds
    (s,) = [d for d in ds if isinstance(d, StopJob)]
    assert s.code == StopCode.NODE_LOST | StopCode.INTERRUPT and s.reason == "node n1 lost; re-queued"
    # once every rank has ended: suspended and re-queued (resumes from its checkpoint elsewhere)
    done = (RankView(0, "n0", RankStatus.KILLED, exit_code=-15), RankView(1, "n1", RankStatus.LOST))
    j2 = JobView(1, "a", 2, status=JobStatus.STOPPING, stop_code=s.code, assigned_nodes=("n0", "n1"), ranks=done)
    (f,) = [d for d in decide(Snapshot(NOW, (j2,), ns)) if isinstance(d, FinishJob)]
    assert (f.status, f.requeue, f.reason) == (JobStatus.SUSPENDED, True, "node n1 lost; re-queued")
    # a chain that has restarted max_node_requeues times fails instead
    ds = decide(Snapshot(NOW, (j,), ns), PolicyConfig(heartbeat_timeout=10, max_node_requeues=3))
    (s,) = [d for d in ds if isinstance(d, StopJob)]
    assert s.code == StopCode.NODE_LOST
    j3 = JobView(1, "a", 2, status=JobStatus.STOPPING, stop_code=s.code, assigned_nodes=("n0", "n1"), ranks=done)
    (f,) = [d for d in decide(Snapshot(NOW, (j3,), ns)) if isinstance(d, FinishJob)]
    assert (f.status, f.requeue) == (JobStatus.FAILED, False)
    # within the timeout nothing happens
    assert decide(Snapshot(NOW, (j,), ns), PolicyConfig(heartbeat_timeout=60)) == []


def test_time_limit_and_watchdog_stop_the_job_and_it_fails_with_the_reason():
    # the limit is per attempt (as Slurm's after a requeue): earlier attempts' 3000 s do not count
    j = run(1, "a", ("n0",), started_at=NOW - 3600, chain_run_s=3000, time_limit=3600, last_output=NOW)
    (s,) = [d for d in decide(Snapshot(NOW, (j,), nodes(1))) if isinstance(d, StopJob)]
    assert (s.code, s.desired, s.reason) == (StopCode.TIMEOUT, "stop", "time limit 1:00:00 reached")
    assert not [d for d in decide(Snapshot(NOW - 1, (j,), nodes(1))) if isinstance(d, StopJob)]
    assert not [d for d in decide(Snapshot(NOW, (replace(j, started_at=NOW - 600),), nodes(1)))
                if isinstance(d, StopJob)]
    # the watchdog: no output for longer than 60 s (counted from the start when there was none)
    j = run(1, "a", ("n0",), started_at=NOW - 100, watchdog=60, last_output=NOW - 61)
    (s,) = [d for d in decide(Snapshot(NOW, (j,), nodes(1))) if isinstance(d, StopJob)]
    assert (s.code, s.reason) == (StopCode.HUNG, "no output for 60 s (watchdog)")
    assert not decide(Snapshot(NOW, (replace(j, last_output=NOW - 59),), nodes(1)))
    assert not decide(Snapshot(NOW, (replace(j, last_output=0, started_at=NOW - 59),), nodes(1)))
    # the attempt ends failed, with the limit's reason
    for code, why in ((StopCode.TIMEOUT, "time limit 1:00:00 reached"), (StopCode.HUNG, "no output for 60 s (watchdog)")):
        j = JobView(1, "a", 1, status=JobStatus.STOPPING, stop_code=code, reason=why, assigned_nodes=("n0",),
                    ranks=(RankView(0, "n0", RankStatus.KILLED, exit_code=-15),), started_at=NOW - 100)
        (f,) = [d for d in decide(Snapshot(NOW, (j,), nodes(1))) if isinstance(d, FinishJob)]
        assert (f.status, f.requeue, f.reason) == (JobStatus.FAILED, False, why)


def test_stop_requests_cancel_queued_and_stop_running():
    q = JobView(1, "a", 1, stop_requested=StopCode.MANUAL_STOP)
    r = JobView(2, "b", 1, status=JobStatus.RUNNING, stop_requested=StopCode.MANUAL_STOP, assigned_nodes=("n0",),
                ranks=(RankView(0, "n0", RankStatus.RUNNING),))
    ds = decide(Snapshot(NOW, (q, r), nodes(2)))
    assert CancelJob(1) in ds
    assert StopJob(2, StopCode.MANUAL_STOP, "stop", "stop requested") in ds


def test_suspend_stops_with_signal_then_requeues_the_chain():
    r = JobView(2, "b", 1, status=JobStatus.RUNNING, stop_requested=StopCode.INTERRUPT, assigned_nodes=("n0",),
                ranks=(RankView(0, "n0", RankStatus.RUNNING),))
    (s,) = [d for d in decide(Snapshot(NOW, (r,), nodes(1))) if isinstance(d, StopJob)]
    assert s.desired == "suspend"
    r = JobView(2, "b", 1, status=JobStatus.STOPPING, stop_requested=StopCode.INTERRUPT, stop_code=StopCode.INTERRUPT,
                assigned_nodes=("n0",), ranks=(RankView(0, "n0", RankStatus.KILLED, exit_code=-15),))
    (f,) = [d for d in decide(Snapshot(NOW, (r,), nodes(1))) if isinstance(d, FinishJob)]
    assert f.status == JobStatus.SUSPENDED and f.requeue


def test_suspend_arriving_after_the_job_ended_does_not_requeue():
    r = JobView(2, "b", 1, status=JobStatus.RUNNING, stop_requested=StopCode.INTERRUPT, assigned_nodes=("n0",),
                ranks=(RankView(0, "n0", RankStatus.SUCCEEDED, exit_code=0),))
    (f,) = [d for d in decide(Snapshot(NOW, (r,), nodes(1))) if isinstance(d, FinishJob)]
    assert f.status == JobStatus.SUCCEEDED and not f.requeue


def test_finishing_job_frees_its_nodes_in_the_same_cycle():
    done = JobView(1, "a", 1, status=JobStatus.RUNNING, assigned_nodes=("n0",),
                   ranks=(RankView(0, "n0", RankStatus.SUCCEEDED, exit_code=0),))
    ds = decide(Snapshot(NOW, (done, JobView(2, "b", 1)), nodes(1)))
    assert any(isinstance(d, FinishJob) for d in ds) and starts(ds) == {2: ("n0",)}


def test_suspended_attempt_holds_its_nodes_for_one_cycle_so_its_successor_wins_them():
    r = JobView(2, "b", 1, status=JobStatus.STOPPING, stop_code=StopCode.INTERRUPT, assigned_nodes=("n0",),
                ranks=(RankView(0, "n0", RankStatus.KILLED, exit_code=-15),))
    ds = decide(Snapshot(NOW, (r, JobView(3, "c", 1)), nodes(1)))
    assert any(isinstance(d, FinishJob) and d.requeue for d in ds) and starts(ds) == {}
    resumed = JobView(4, "b", 1, first_id=2)
    assert starts(decide(Snapshot(NOW, (JobView(3, "c", 1), resumed), nodes(1)))) == {4: ("n0",)}


# -- #16 time-sharing rules ------------------------------------------------------------------------

def topo(zones="ab", leaves=2, per=4):
    """``zones`` x ``leaves`` leaves x ``per`` nodes, named like a00n1 (zone a, leaf 0, node 1)."""
    return tuple(NodeView(f"{z}{lf}n{i}", zone=f"zone-{z}", leaf=f"{z}-leaf{lf}", last_seen=NOW)
                 for z in zones for lf in range(leaves) for i in range(per))


def reasons(ds):
    return {d.job_id: d.reason for d in ds if isinstance(d, SetReason)}


def test_topology_best_fit_leaf_one_zone_and_one_cross_zone_job():
    busy = run(1, "x", ("a0n0", "a0n1", "a0n2"))              # leaf a-0 keeps 1 free node
    ds = decide(Snapshot(NOW, (busy, JobView(2, "a", 1), JobView(3, "b", 2)), topo()))
    assert starts(ds) == {2: ("a0n3",), 3: ("a1n0", "a1n1")}  # the tightest leaf that holds each
    # a job bigger than a leaf stays in one zone, in as few leaves as possible
    ds = decide(Snapshot(NOW, (busy, JobView(4, "a", 6)), topo()))
    assert starts(ds) == {4: ("b0n0", "b0n1", "b0n2", "b0n3", "b1n0", "b1n1")}
    # a leaf-sized job never spreads over leaves, even with enough free nodes in all
    spread = (run(1, "x", ("a0n0",)), run(5, "x", ("a1n0",)), run(6, "x", ("b0n0",)), run(7, "x", ("b1n0",)))
    ds = decide(Snapshot(NOW, (*spread, JobView(8, "a", 4)), topo()))
    assert starts(ds) == {} and reasons(ds) == {8: "reserved: starts when job 1 ends"}
    ds = decide(Snapshot(NOW, (*spread, JobView(8, "a", 4)), topo()), PolicyConfig(default_time_limit=0))
    assert starts(ds) == {} and reasons(ds) == {8: "waiting for 4 free nodes in one leaf"}
    # bigger than a zone: one cross-zone job at a time
    (d,) = [d for d in decide(Snapshot(NOW, (busy, JobView(9, "a", 10)), topo())) if isinstance(d, StartJob)]
    assert d.nodes[:8] == tuple(n.name for n in topo("b")) and d.nodes[8:] == ("a0n3", "a1n0")  # fragments first
    cross = run(11, "x", ("a1n3", "b1n3"))
    ds = decide(Snapshot(NOW, (cross, JobView(9, "a", 10)), topo()))
    assert starts(ds) == {} and reasons(ds) == {9: "reserved: starts when job 11 ends"}
    ds = decide(Snapshot(NOW, (cross, JobView(9, "a", 10)), topo()), PolicyConfig(default_time_limit=0))
    assert starts(ds) == {} and reasons(ds) == {9: "waiting for a cross-zone slot"}
    assert starts(decide(Snapshot(NOW, (cross, JobView(9, "a", 10)), topo()), PolicyConfig(cross_zone_jobs=2)))


def test_preemption_least_work_lost_strictly_higher_and_min_run_time():
    ns = topo("a", 1, 4)
    jobs = (run(1, "a", ("a0n0",), started_at=NOW - 1000, last_checkpoint=NOW - 10),   # loses 10 s
            run(2, "b", ("a0n1",), started_at=NOW - 1000),                             # loses 1000 s
            run(3, "c", ("a0n2",), started_at=NOW - 10),                               # ran < min_run_time
            run(4, "d", ("a0n3",), priority=30, started_at=NOW - 5000))                # same priority
    ds = decide(Snapshot(NOW, (*jobs, JobView(5, "e", 1, priority=30)), ns))
    assert stops(ds) == {1: "preempted by job 5 (user e, priority 30)"}
    (s,) = [d for d in ds if isinstance(d, StopJob)]
    assert (s.code, s.desired) == (StopCode.INTERRUPT, "suspend") and reasons(ds) == {5: "preempting job 1"}
    # the fewest victims that make room: two nodes, two victims (never the young or the equal one)
    ds = decide(Snapshot(NOW, (*jobs, JobView(5, "e", 2, priority=30)), ns))
    assert set(stops(ds)) == {1, 2} and reasons(ds) == {5: "preempting jobs 1, 2"}
    assert not stops(decide(Snapshot(NOW, (*jobs, JobView(5, "e", 3, priority=30)), ns)))
    # equal priority (same user or not) never preempts; min_run_time=0 makes job 3 a victim
    assert not stops(decide(Snapshot(NOW, (*jobs, JobView(5, "a", 1, priority=10)), ns)))
    ds = decide(Snapshot(NOW, (*jobs, JobView(5, "e", 3, priority=30)), ns), PolicyConfig(min_run_time=0))
    assert set(stops(ds)) == {1, 2, 3}
    # one bigger victim instead of two small ones
    big = (run(1, "a", ("a0n0",), started_at=NOW - 100), run(2, "b", ("a0n1",), started_at=NOW - 100),
           run(3, "c", ("a0n2", "a0n3"), started_at=NOW - 900))
    ds = decide(Snapshot(NOW, (*big, JobView(5, "e", 2, priority=20)), ns), PolicyConfig(min_run_time=0))
    assert set(stops(ds)) == {3}


def test_victims_tie_break_lowest_priority_then_newest():
    same = dict(started_at=NOW - 1000)
    jobs = (run(1, "a", ("a0n0",), priority=8, **same), run(2, "b", ("a0n1",), priority=5, **same))
    assert set(stops(decide(Snapshot(NOW, (*jobs, JobView(9, "e", 1, priority=20)), topo("a", 1, 2))))) == {2}
    ns = topo("a", 1, 3)
    jobs = (run(1, "a", ("a0n0",), **same), run(2, "b", ("a0n1",), first_id=0, **same),
            run(3, "c", ("a0n2",), **same))
    assert set(stops(decide(Snapshot(NOW, (*jobs, JobView(9, "e", 1, priority=20)), ns)))) == {3}


def test_preemptor_waits_for_its_victims_and_keeps_the_nodes_it_needs():
    ns = topo("a", 1, 4)
    victim = replace(run(1, "a", ("a0n0", "a0n1")), status=JobStatus.STOPPING, stop_code=StopCode.INTERRUPT,
                     reason="preempted by job 5 (user e, priority 20)")
    other = run(2, "b", ("a0n3",), started_at=NOW - 5000)                 # a victim it could pick
    jobs = (victim, other, JobView(5, "e", 3, priority=20, reason="preempting job 1"), JobView(6, "f", 1))
    ds = decide(Snapshot(NOW, jobs, ns))
    assert stops(ds) == {} and starts(ds) == {}  # no more victims; a0n2 stays free for job 5
    assert reasons(ds) == {6: "reserved: starts when job 2 ends"}   # a0n2 is not its to take
    # once the victim is gone the preemptor starts on its nodes
    ds = decide(Snapshot(NOW, (other, JobView(5, "e", 3, priority=20), JobView(6, "f", 1)), ns))
    assert starts(ds) == {5: ("a0n0", "a0n1", "a0n2")}


def test_backfill_starts_only_jobs_that_end_before_the_reserved_start():
    ns = topo("a", 1, 4)
    r = run(1, "a", ("a0n0", "a0n1"), started_at=NOW - 100, time_limit=200)    # ends at NOW + 100
    jobs = (r, JobView(2, "b", 4), JobView(3, "c", 1, time_limit=50), JobView(4, "d", 1))
    ds = decide(Snapshot(NOW, jobs, ns))
    assert starts(ds) == {3: ("a0n2",)}       # ends at NOW + 50: delays nobody
    assert reasons(ds)[2] == "reserved: starts when job 1 ends"
    assert 4 in reasons(ds)                   # no end known: it would delay job 2
    # a limit that ends after the reserved start does not backfill either
    ds = decide(Snapshot(NOW, (r, JobView(2, "b", 4), JobView(3, "c", 1, time_limit=150)), ns))
    assert starts(ds) == {}
    # [Note: unknown ends] without a limit a job is expected to run default_time_limit: the big job
    # keeps its reservation and the small one without a limit waits; with the estimate off nothing is
    # reserved and the small job starts
    ds = decide(Snapshot(NOW, (replace(r, time_limit=0), JobView(2, "b", 4), JobView(4, "d", 1)), ns))
    assert starts(ds) == {} and reasons(ds)[2] == "reserved: starts when job 1 ends"
    ds = decide(Snapshot(NOW, (replace(r, time_limit=0), JobView(2, "b", 4), JobView(4, "d", 1)), ns),
                PolicyConfig(default_time_limit=0))
    assert set(starts(ds)) == {4}


def test_above_normal_is_demoted_after_demote_after_of_run_time():
    r = run(1, "a", ("n0",), priority=20, started_at=NOW - 1000, chain_run_s=900)
    q_old = JobView(2, "b", 1, priority=20, chain_run_s=2000)
    q_new = JobView(3, "c", 1, priority=20)
    ds = decide(Snapshot(NOW, (r, q_old, q_new), nodes(4)))
    prio = {d.job_id: d.priority for d in ds if isinstance(d, SetPriority)}
    assert prio == {1: 10, 2: 10}
    assert {d.job_id: d.priority for d in ds if isinstance(d, StartJob)} == {2: 10, 3: 20}
    assert not [d for d in decide(Snapshot(NOW, (r,), nodes(4)), PolicyConfig(demote_after=2000))
                if isinstance(d, SetPriority)]
    # the reference policy does not age
    assert not [d for d in plan(Snapshot(NOW, (r,), nodes(4)), profile=PROFILES["reference-fifo"])[0]
                if isinstance(d, SetPriority)]


def test_auto_takes_the_highest_level_with_quota_room():
    q = (QuotaView("user:alice", 1, priority=30), QuotaView("user:alice", 4, priority=20))
    r = run(1, "alice", ("n0",), priority=30)
    auto = JobView(2, "alice", 1, priority=10, submitted_priority=AUTO)
    ds = decide(Snapshot(NOW, (r, auto, JobView(3, "bob", 1, submitted_priority=AUTO)), nodes(4), q))
    assert [d for d in ds if isinstance(d, SetPriority)] == [SetPriority(2, 20, "auto")]
    assert {d.job_id: d.priority for d in ds if isinstance(d, StartJob)} == {2: 20, 3: 10}
    # with room at 30 it takes 30
    assert SetPriority(2, 30, "auto") in decide(Snapshot(NOW, (auto,), nodes(4), q))


def test_never_fits_and_queue_position():
    ns = nodes(4)
    assert never_fits(5, "a", None, 10, ns, ()) == "asks 5 nodes, the cluster has 4"
    assert never_fits(3, "a", "g", 10, ns, (QuotaView("group:g", 2),)) == "asks 3 nodes, quota group:g is 2"
    assert never_fits(2, "a", "g", 10, ns, (QuotaView("group:g", 2),)) is None
    q = (QuotaView("user:a", 1, priority=30), QuotaView("user:a", 1, priority=10))
    assert never_fits(2, "a", None, AUTO, ns, q) == ("asks 2 nodes, quota user:a at priority 30 is 1; "
                                                     "quota user:a at priority 10 is 1")
    assert never_fits(2, "a", None, AUTO, ns, (*q, QuotaView("user:a", 4, priority=20))) is None
    assert never_fits(2, "a", None, 20, ns, q) is None
    jobs = (JobView(1, "a", 1), JobView(2, "b", 1, priority=30), JobView(7, "c", 1, first_id=3), run(4, "d", ("n0",)))
    assert queue_position(Snapshot(NOW, jobs, ns)) == {2: 1, 1: 2, 7: 3}


def test_simulator_snapshots_without_ranks_still_hit_limits_and_preempt():
    """A simulator passes running attempts without ranks (and nodes seen ``now``)."""
    j = JobView(1, "a", 1, status=JobStatus.RUNNING, assigned_nodes=("n0",), started_at=NOW - 100, time_limit=60)
    assert [d.code for d in decide(Snapshot(NOW, (j,), nodes(1))) if isinstance(d, StopJob)] == [StopCode.TIMEOUT]
    low = JobView(2, "b", 1, status=JobStatus.RUNNING, assigned_nodes=("n0",), started_at=NOW - 1000)
    assert set(stops(decide(Snapshot(NOW, (low, JobView(3, "c", 1, priority=30)), nodes(1))))) == {2}


def test_a_preemptor_holds_its_quota_share_while_its_victims_stop():
    ns = topo("a", 1, 3)
    q = (QuotaView("user:e", 2, priority=30),)
    jobs = (run(1, "a", ("a0n0", "a0n1")), JobView(5, "e", 2, priority=30), JobView(6, "e", 1, priority=30))
    ds = decide(Snapshot(NOW, jobs, ns, q))
    assert set(stops(ds)) == {1} and starts(ds) == {}   # a0n2 is not given to job 6: over e's quota
    assert reasons(ds)[6].startswith("out_of_quota: user:e at priority 30 uses 2 of 2")


def test_jobs_without_time_limits_cannot_starve_a_big_job_ahead():
    # four leaves of 4 nodes, one running one-node job without a time limit in each: a 4-node job
    # waits for a whole leaf. Job 1 started first, so its leaf (a-leaf0) is expected to free first
    # and is reserved. A later one-node job without a limit (expected to run default_time_limit)
    # must not take a free node of that leaf; one whose limit ends before the reserved start may.
    running = (run(1, "x", ("a0n0",)), run(2, "x", ("a1n0",), started_at=NOW - 10),
               run(3, "x", ("b0n0",), started_at=NOW - 10), run(4, "x", ("b1n0",), started_at=NOW - 10))
    big, small, short = JobView(10, "a", 4), JobView(11, "b", 1), JobView(12, "c", 1, time_limit=600)
    ds = decide(Snapshot(NOW, (*running, big, small, short), topo()))
    assert reasons(ds)[10] == "reserved: starts when job 1 ends"
    started = starts(ds)
    assert set(started) == {11, 12}
    assert not started[11][0].startswith("a0")
    # with the estimate off, nothing is reserved and the queue is served greedily
    ds = decide(Snapshot(NOW, (*running, big, small), topo()), PolicyConfig(default_time_limit=0))
    assert 11 in starts(ds) and reasons(ds)[10] == "waiting for 4 free nodes in one leaf"


def test_a_job_bigger_than_a_zone_preempts_the_job_holding_the_cross_zone_slot():
    # the only cross-zone slot is held by the victim itself: suspending it frees the slot
    v = run(1, "alice", ("n0", "n1", "n2", "n3"))
    big = JobView(2, "bob", 4, priority=30)
    ds = decide(Snapshot(NOW, (v, big), nodes(4)))
    assert stops(ds) == {1: "preempted by job 2 (user bob, priority 30)"}
    assert reasons(ds) == {2: "preempting job 1"}
    # while it stops, nothing more is asked of it; once it is gone the preemptor spans both zones
    stopping = replace(v, status=JobStatus.STOPPING, stop_code=StopCode.INTERRUPT,
                       reason="preempted by job 2 (user bob, priority 30)")
    assert not stops(decide(Snapshot(NOW, (stopping, replace(big, reason="preempting job 1")), nodes(4))))
    assert starts(decide(Snapshot(NOW, (replace(big, reason="preempting job 1"),), nodes(4)))) == {
        2: ("n0", "n1", "n2", "n3")}
    # a victim within one zone does not free the slot another job holds
    cross = run(3, "carol", ("n1", "n2"), priority=40)
    ds = decide(Snapshot(NOW, (cross, run(4, "alice", ("n0",)), run(5, "alice", ("n3",)), JobView(6, "bob", 3, priority=30)),
                         nodes(4)))
    assert not stops(ds)


def test_an_ended_attempt_keeps_why_it_was_stopped_for_the_restart_history():
    def ended(reason, code):
        j = JobView(1, "a", 1, status=JobStatus.STOPPING, stop_code=code, reason=reason, assigned_nodes=("n0",),
                    ranks=(RankView(0, "n0", RankStatus.KILLED, exit_code=-15),))
        (f,) = [d for d in decide(Snapshot(NOW, (j,), nodes(1))) if isinstance(d, FinishJob)]
        return f.status, f.reason

    assert ended("preempted by job 7 (user bob, priority 30)", StopCode.INTERRUPT) == (
        JobStatus.SUSPENDED, "preempted by job 7 (user bob, priority 30); the chain continues in a new attempt")
    assert ended("suspend requested", StopCode.INTERRUPT) == (
        JobStatus.SUSPENDED, "suspend requested; the chain continues in a new attempt")
    assert ended("stop requested", StopCode.MANUAL_STOP) == (JobStatus.STOPPED, "stop requested")
