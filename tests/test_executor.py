"""Executor on CPU with gloo: data transfer between calls, overlap of disjoint meshes, failure handling."""

import json
import os
import signal
import threading
import time

import pytest

from executor.data import SeqBatch, split_balanced
from executor.launch import launch
from executor.schedule import build_schedule
from reallm.placement import Placement
from tests.toy_runtime import factory, toy_plan


def read_logs(d, n):
    out = []
    for r in range(n):
        with open(os.path.join(d, f"log{r}.json")) as f:
            out += [(r, *e) for e in json.load(f)]
    return out


def expected_w(step, n):
    ids = [step * 100 + i for i in range(n)]
    lens = [1 + (i * 7) % 5 for i in range(n)]
    return {s: [3 * (j + s) + 1 for j in range(ln)] for s, ln in zip(ids, lens)}


def check_results(d, steps, n):
    for step in range(steps):
        with open(os.path.join(d, f"c_step{step}.json")) as f:
            parts = json.load(f)
        got, order = {}, []
        for p in parts:
            off = 0
            for s, ln in zip(p["ids"], p["lens"]):
                got[s] = p["w"][off:off + ln]
                off += ln
                order.append(s)
        assert order == sorted(order)  # heads in dp order hold contiguous id ranges: input order kept
        assert got == expected_w(step, n)


@pytest.mark.parametrize("layout", ["disjoint", "shared"])
def test_transfer_and_overlap(tmp_path, layout):
    if layout == "disjoint":
        pl = {"a": Placement((0, 1), dp=2), "b": Placement((2, 3), dp=1, pp=2),
              "c": Placement((3, 2, 1, 0), dp=2, pp=2)}
    else:
        pl = {"a": Placement((0, 1), dp=2), "b": Placement((0, 1), dp=1, pp=2), "c": Placement((0, 1, 2, 3), dp=4)}
    plan = toy_plan(pl, 4)
    assert launch(plan, runtime_factory=factory(str(tmp_path), steps=2, sleep_s=0.4)) == 0
    check_results(str(tmp_path), 2, 7)
    logs = read_logs(str(tmp_path), 4)
    for step in range(2):
        a = [e for e in logs if e[1] == step and e[2] == "a"]
        b = [e for e in logs if e[1] == step and e[2] == "b"]
        a_span = (min(e[3] for e in a), max(e[4] for e in a))
        b_span = (min(e[3] for e in b), max(e[4] for e in b))
        overlap = min(a_span[1], b_span[1]) - max(a_span[0], b_span[0])
        if layout == "disjoint":
            assert overlap > 0.2, (a_span, b_span)  # a and b ran at the same time
        else:  # same devices: on each device one after the other
            for r in (0, 1):
                (ra,), (rb,) = [e for e in a if e[0] == r], [e for e in b if e[0] == r]
                assert ra[4] <= rb[3], (ra, rb)


def test_uneven_dp_split(tmp_path):
    plan = toy_plan({"a": Placement((0, 1, 2), dp=3), "b": Placement((1,)), "c": Placement((0, 2), dp=2)}, 3, n_seqs=4)
    assert launch(plan, runtime_factory=factory(str(tmp_path), steps=1)) == 0
    check_results(str(tmp_path), 1, 4)


def test_exception_in_one_rank_ends_all(tmp_path, capfd):
    plan = toy_plan({"a": Placement(tuple(range(8)), dp=8), "b": Placement(tuple(range(8)), dp=8),
                     "c": Placement(tuple(range(8)), dp=4, pp=2)}, 8, n_seqs=16)
    t0 = time.time()
    rc = launch(plan, runtime_factory=factory(str(tmp_path), steps=3, fail=(1, "b", 5)))
    assert rc != 0 and time.time() - t0 < 60
    err = capfd.readouterr().err
    assert "rank 5 failed" in err and "injected failure" in err
    assert_all_dead(tmp_path, 8)


def test_sigkill_of_one_worker_ends_all(tmp_path, capfd):
    plan = toy_plan({"a": Placement(tuple(range(8)), dp=8), "b": Placement(tuple(range(8)), dp=8),
                     "c": Placement(tuple(range(8)), dp=8)}, 8, n_seqs=16)

    def killer():
        pid_file = tmp_path / "pid6"
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    th = threading.Thread(target=killer)
    th.start()
    t0 = time.time()
    rc = launch(plan, runtime_factory=factory(str(tmp_path), steps=1, fail="hang"))
    th.join()
    assert rc != 0 and time.time() - t0 < 60
    assert "rank 6 died (killed by signal 9)" in capfd.readouterr().err
    assert_all_dead(tmp_path, 8)


def assert_all_dead(d, n):
    for r in range(n):
        f = os.path.join(d, f"pid{r}")
        if os.path.exists(f):
            pid = int(open(f).read())
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_schedule_is_global_and_deterministic():
    pl = {"a": Placement((0, 1), dp=2), "b": Placement((2, 3), dp=2), "c": Placement((0, 1, 2, 3), dp=4)}
    s = build_schedule(toy_plan(pl, 4))
    kinds = [str(op) for op in s.ops]
    assert kinds[:2] == ["call a", "call b"]
    assert kinds.index("transfer a→c ['y']") < kinds.index("call c")
    assert s == build_schedule(toy_plan(pl, 4))
    assert (0, 1) in s.group_rank_sets and (0, 1, 2, 3) in s.group_rank_sets


def test_split_balanced_and_seqbatch():
    assert split_balanced(list(range(6)), [1] * 6, 3) == [[0, 1], [2, 3], [4, 5]]
    assert split_balanced(list(range(4)), [10, 1, 1, 1], 2) == [[0], [1, 2, 3]]
    assert split_balanced(list(range(4)), [10, 1, 1, 1], 2, min_per_part=2) == [[0, 1], [2, 3]]
    assert sorted(len(p) for p in split_balanced(list(range(4)), [1] * 4, 3)) == [1, 1, 2]
    import torch
    b = SeqBatch.from_lists([5, 3], {"x": [torch.ones(2), torch.zeros(3)]})
    c = SeqBatch.concat([b.select([3]), b.select([5])])
    assert c.ids == [3, 5] and c.lens["x"] == [3, 2] and c.data["x"].tolist() == [0, 0, 0, 1, 1]
