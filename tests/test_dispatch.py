"""Credits, leases and redelivery, stepped directly (no sockets)."""

from collections import Counter

from broker.dispatch import DONE, FAILED, LEASED, QUEUED, Dispatcher
from broker.wire import Job


def jobs(n):
    return [Job(f"j{i}", "b", f"/in/{i}.jpg", f"/out/{i}.jpg", {}) for i in range(n)]


def drain(d):
    sent = []
    while (a := d.next_assignment()) is not None:
        sent.append(a)
    return sent


def test_no_worker_holds_more_than_its_credit():
    d = Dispatcher(jobs(20))
    d.register("a", 2, 0.0)
    d.register("b", 2, 0.0)
    sent = drain(d)
    assert Counter(w for w, _ in sent) == {"a": 2, "b": 2}
    assert d.queued == 16


def test_fast_worker_gets_more_work_than_slow_one():
    d = Dispatcher(jobs(30))
    d.register("fast", 1, 0.0)
    d.register("slow", 1, 0.0)
    done = Counter()
    drain(d)
    for tick in range(20):
        # "fast" completes every tick, "slow" every fourth.
        for worker in ("fast", "slow"):
            held = list(d.workers[worker].held)
            if held and (worker == "fast" or tick % 4 == 3):
                d.complete(held[0], worker, True)
                done[worker] += 1
        drain(d)
    assert done["fast"] >= 3 * done["slow"] > 0


def test_late_joiner_is_served_at_once():
    d = Dispatcher(jobs(10))
    d.register("a", 2, 0.0)
    drain(d)
    d.register("late", 2, 1.0)
    assert Counter(w for w, _ in drain(d)) == {"late": 2}


def test_in_a_small_batch_a_fast_worker_cannot_hoard():
    d = Dispatcher(jobs(40))
    for name, credit in (("fast", 8), ("b", 2), ("c", 2), ("d", 2)):
        d.register(name, credit, 0.0)
    held = Counter(w for w, _ in drain(d))
    assert held["fast"] == 3 and held["b"] == held["c"] == held["d"] == 2  # 40 / (4 x 4) -> 3
    big = Dispatcher(jobs(2000))
    big.register("fast", 8, 0.0)
    assert len(drain(big)) == 8  # a big batch leaves the credit alone


def test_last_jobs_wait_for_an_empty_handed_worker():
    """No last job queues behind another worker's job while a worker could idle."""
    d = Dispatcher(jobs(6))
    d.register("a", 2, 0.0)
    d.register("b", 2, 0.0)
    assert Counter(w for w, _ in drain(d)) == {"a": 2, "b": 2}  # 2 left: as many as workers
    first_of_a = sorted(d.workers["a"].held)[0]
    d.complete(first_of_a, "a", True)
    assert drain(d) == []  # "a" still holds one: the job waits
    d.complete(sorted(d.workers["a"].held)[0], "a", True)
    assert [w for w, _ in drain(d)] == ["a"]  # now empty-handed, "a" takes one
    assert d.queued == 1 and drain(d) == []


def test_failing_a_leased_job_frees_its_workers_credit():
    """The broker fails a job it could not send (bytes transport, unreadable
    input): the worker must be free for the remaining jobs."""
    d = Dispatcher(jobs(3))
    d.register("a", 1, 0.0)
    (worker, job), = drain(d)
    d.fail(job.job_id)
    assert d.workers["a"].free == 1
    assert [w for w, _ in drain(d)] == ["a"]


def test_jobs_lost_on_the_way_to_an_idle_worker_come_back_then_fail():
    d = Dispatcher(jobs(4), max_attempts=2)
    d.register("a", 2, 0.0)
    assert [d.next_assignment(now=1.0)[1].job_id, d.next_assignment(now=5.0)[1].job_id] == ["j0", "j1"]
    # Idle for 3 s at t=6: the job sent at 1.0 never arrived; the one sent at 5.0 may still.
    lost = d.reclaim("a", 6.0 - 3.0, "lost on the way")
    assert lost.requeued == ("j0",) and lost.failed == ()
    assert d.workers["a"].held == {"j1"} and d.jobs["j0"].status == QUEUED
    (_, again), = drain(d)
    assert again.job_id == "j0" and again.attempt == 2
    d.jobs["j0"].leased_at = 0.0
    lost = d.reclaim("a", 3.0, "lost on the way")
    assert lost.failed == (("j0", "gave up after 2 attempts: lost on the way"),)
    assert d.reclaim("a", 3.0, "lost on the way") is None


def test_lost_worker_jobs_go_back_first_and_culprit_gets_a_strike():
    d = Dispatcher(jobs(5), max_attempts=3)
    d.register("a", 2, 0.0)
    held = sorted(j.job_id for _, j in drain(d))
    d.seen("a", 1.0, busy_job=held[0], busy_s=0.5)
    lost = d.lose("a", "killed")
    assert sorted(lost.requeued) == held and lost.failed == ()
    assert list(d.queue)[:2] == held
    assert d.jobs[held[0]].strikes == 1 and d.jobs[held[1]].strikes == 0
    assert d.jobs[held[0]].job.attempt == 2
    assert d.leased == 0 and d.remaining == 5


def test_a_worker_stopped_on_request_blames_no_image():
    """Stopping a worker busy with a big image, again and again, must not fail that image."""
    d = Dispatcher(jobs(1), max_attempts=1)
    for attempt in range(3):
        d.register(f"w{attempt}", 1, 0.0)
        (worker, job), = drain(d)
        d.seen(worker, 1.0, busy_job=job.job_id, busy_s=5.0)
        assert d.lose(worker, "stopping", died=False).failed == ()
    assert d.jobs["j0"].strikes == 0 and d.queued == 1


def test_poison_job_fails_after_max_attempts():
    d = Dispatcher(jobs(1), max_attempts=2)
    for attempt in range(2):
        d.register(f"w{attempt}", 1, 0.0)
        (worker, job), = drain(d)
        lost = d.lose(worker, "worker died", culprit=job.job_id)
    assert lost.failed[0][0] == "j0" and "gave up after 2 attempts" in lost.failed[0][1]
    assert d.jobs["j0"].status == FAILED and d.remaining == 0


def test_duplicate_and_late_completions_count_once():
    d = Dispatcher(jobs(1))
    d.register("a", 1, 0.0)
    drain(d)
    d.lose("a", "silent")                     # written off, job requeued
    d.register("b", 1, 1.0)
    (worker, job), = drain(d)
    assert worker == "b"
    assert d.complete("j0", "a", True) == "new"          # the slow one finished after all
    assert d.complete("j0", "b", True) == "duplicate"    # the redelivered copy
    assert d.jobs["j0"].status == DONE and d.remaining == 0
    assert d.workers["b"].free == 1                      # its credit came back
    assert d.complete("nope", "b", True) == "unknown"


def test_reregistering_worker_keeps_its_leases():
    d = Dispatcher(jobs(3))
    d.register("a", 2, 0.0)
    drain(d)
    d.register("a", 2, 5.0)  # an idle reminder racing a job in flight
    assert d.leased == 2 and len(d.workers["a"].held) == 2


def test_unsend_puts_the_job_back_in_front():
    d = Dispatcher(jobs(3))
    d.register("a", 1, 0.0)
    (worker, job), = drain(d)
    d.unsend(worker, job.job_id)
    assert d.queue[0] == job.job_id and d.jobs[job.job_id].status == QUEUED and d.leased == 0


def test_a_job_given_back_unstarted_is_first_in_line_with_no_strike():
    d = Dispatcher(jobs(3))
    d.register("a", 2, 0.0)
    (_, first), (_, second) = drain(d)
    assert d.give_back("a", second.job_id) and not d.give_back("a", second.job_id)
    assert not d.give_back("ghost", first.job_id) and not d.give_back("a", "nope")
    state = d.jobs[second.job_id]
    assert d.queue[0] == second.job_id and state.status == QUEUED and state.strikes == 0
    assert d.leased == 1 and d.workers["a"].held == {first.job_id}
    assert d.complete(first.job_id, "a", True) == "new"


def test_silent_and_overdue_workers():
    d = Dispatcher(jobs(1))
    d.register("a", 1, 0.0)
    d.register("b", 1, 0.0)
    d.seen("b", 9.0, busy_job="j0", busy_s=100.0)
    assert d.silent_workers(10.0, 5.0) == ["a"]
    assert d.overdue_workers(60.0) == ["b"]
    assert d.jobs["j0"].status == QUEUED
    drain(d)
    assert LEASED in {s.status for s in d.jobs.values()}


def test_only_a_worker_the_job_was_sent_to_can_complete_it():
    d = Dispatcher(jobs(3))
    d.register("a", 1, 0.0)
    (_, first), = drain(d)
    assert d.complete("j1", "a", True) == "unsent"      # still queued: never sent to anyone
    assert d.complete(first.job_id, "ghost", True) == "unsent"
    assert d.jobs[first.job_id].status == LEASED and d.finished == 0
    # A worker written off whose late completion arrives did the work: it counts.
    d.lose("a", "silent")
    assert d.jobs[first.job_id].status == QUEUED
    assert d.complete(first.job_id, "a", True) == "new" and d.jobs[first.job_id].status == DONE
    # A send that failed never reached the worker.
    d.register("b", 1, 0.0)
    worker, job = d.next_assignment()
    d.unsend(worker, job.job_id)
    assert d.complete(job.job_id, "b", True) == "unsent"


def test_a_worker_asks_for_more_only_when_its_jobs_are_short():
    from sidecar.worker import Credit

    one = Credit(1)
    assert not one.update(5.0) and one.value == 1          # --credit 1: one image at a time
    short = Credit(2)
    for _ in range(5):
        short.update(0.001)
    assert short.value == 21                               # 20 ms of queued work, plus the running one
    for _ in range(100):
        short.update(3.0)
    assert short.value == 2                                # back to the floor for big images


def test_a_worker_that_refuses_everything_leaves_every_job_to_the_others():
    """A worker in the wrong folder: each job it refuses goes to another, none fails."""
    d = Dispatcher(jobs(40))
    d.register("wrong", 2, 0.0)
    d.register("right", 2, 0.0)
    done, refusals = [], 0
    while d.remaining:
        sent = drain(d)
        assert sent or d.workers["right"].held, "nothing left to send, yet jobs remain"
        for worker, job in sent:
            if worker == "wrong":
                assert "wrong" not in d.jobs[job.job_id].refused_by, "sent back to a worker that refused it"
                assert d.refuse("wrong", job.job_id, "input path is outside")
                refusals += 1
        assert d.unreachable() is None
        for job_id in list(d.workers["right"].held)[:1]:  # the good worker is the slow one
            assert d.complete(job_id, "right", True) == "new"
            done.append(job_id)
    assert sorted(done) == sorted(f"j{i}" for i in range(40))
    assert refusals > 0 and all(d.jobs[j].status == DONE for j in done)


def test_jobs_every_live_worker_refused_are_unreachable_until_another_joins():
    d = Dispatcher(jobs(3))
    d.register("a", 1, 0.0)
    d.register("b", 1, 0.0)
    first = dict((w, j.job_id) for w, j in drain(d))
    assert d.refuse("a", first["a"], "outside a's folders")
    assert not d.refuse("a", first["a"], "again")  # not its job any more
    # "b" is busy; when it is free it gets the job "a" refused, before anything else.
    assert d.complete(first["b"], "b", True) == "new"
    sent = dict((w, j.job_id) for w, j in drain(d))
    assert sent["b"] == first["a"] and "a" in sent
    assert d.refuse("b", first["a"], "outside b's folders")
    assert d.unreachable() is None  # "a" still holds a job
    assert d.complete(sent["a"], "a", True) == "new"
    assert d.unreachable() == [first["a"]] and drain(d) == []
    # Nothing failed on its own: a worker that can reach it is served at once.
    d.register("c", 1, 0.0)
    assert d.unreachable() is None
    assert drain(d) == [("c", d.jobs[first["a"]].job)]


def test_a_refused_job_waits_when_the_workers_that_had_not_refused_it_go():
    d = Dispatcher(jobs(2))
    d.register("a", 1, 0.0)
    d.register("b", 1, 0.0)
    first = dict((w, j.job_id) for w, j in drain(d))
    d.refuse("a", first["a"], "outside a's folders")
    lost = d.lose("b", "killed")
    assert lost.requeued == (first["b"],) and lost.failed == ()
    assert d.unreachable() is None  # the job "b" held has not been refused
    d.refuse("a", drain(d)[0][1].job_id, "outside a's folders")
    assert sorted(d.unreachable()) == sorted(first.values())
    assert d.lose("a", "gone").failed == () and d.unreachable() is None  # no worker: not "unreachable"
    assert d.queued == 2 and d.finished == 0


def test_a_job_nobody_can_take_does_not_hold_up_one_somebody_can():
    """Workers with folders of their own: jobs only "a" may take wait behind
    jobs nobody may take, and must still go to "a"."""
    d = Dispatcher([Job(f"{folder}{i}", "b", f"/{folder}/{i}.jpg", f"/out/{folder}{i}.jpg", {})
                    for folder in "ca" for i in range(3)])
    d.register("a", 1, 0.0)
    d.register("b", 1, 0.0)
    roots = {"a": "/a/", "b": "/b/"}
    done = []
    for _ in range(100):
        sent = drain(d)
        if not sent and d.unreachable() is not None:
            break
        for worker, job in sent:
            if job.input.startswith(roots[worker]):
                d.complete(job.job_id, worker, True)
                done.append(job.job_id)
            else:
                d.refuse(worker, job.job_id, f"outside {worker}'s folders")
    assert sorted(done) == ["a0", "a1", "a2"]
    assert sorted(d.unreachable()) == ["c0", "c1", "c2"]
