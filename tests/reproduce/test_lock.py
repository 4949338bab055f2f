"""reproduce's per-run lock: two processes into one --out never train the same run, a crashed holder leaves no lock,
and --report-only says who trains what."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from outlierfree.reproduce import PRESETS, ReproduceRequest, reproduce
from outlierfree.reproduce.runner import RunLock, lock_holder, run_status

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="runs are locked with fcntl.flock (POSIX)")

# a child that takes a run's lock, says so, and then sleeps until it is killed
HOLDER = """
import sys, time
from pathlib import Path
from outlierfree.reproduce.runner import RunLock
lock = RunLock(Path(sys.argv[1]))
print("held" if lock.acquire() else "busy", flush=True)
time.sleep(600)
"""


def quiet(*a, **k):
    pass


def _holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
    run_dir = tmp_path / "bert-vanilla-s0"
    assert lock_holder(run_dir) is None  # no directory, no lock file: nobody
    a, b = RunLock(run_dir), RunLock(run_dir)
    assert a.acquire()
    assert not b.acquire()  # a second open of the file conflicts, even in the same process
    assert lock_holder(run_dir) == os.getpid()
    a.release()
    assert lock_holder(run_dir) is None
    assert b.acquire() and not a.acquire()  # free again: the other one takes it
    with b:  # leaving the block releases it
        assert lock_holder(run_dir) == os.getpid()
    assert lock_holder(run_dir) is None and a.acquire()
    a.release()


def test_a_killed_holder_leaves_the_run_unlocked(tmp_path):
    run_dir = tmp_path / "bert-vanilla-s0"
    p = _holder(run_dir)
    try:
        assert lock_holder(run_dir) == p.pid
        assert not RunLock(run_dir).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert lock_holder(run_dir) is None  # the OS dropped the flock with the process
    lock = RunLock(run_dir)
    assert lock.acquire() and lock_holder(run_dir) == os.getpid()
    lock.release()


def test_a_held_run_is_skipped_and_reported_as_training_by_its_pid(tmp_path):
    out = tmp_path / "o"
    spec = PRESETS["quick"].runs(("bert",), ("vanilla",), (0,), 2)[0]
    run_dir = out / "runs" / spec.name
    p = _holder(run_dir)  # another process "trains" bert-vanilla-s0
    try:
        assert run_status(spec, run_dir) == f"training by pid {p.pid}"
        lines: list[str] = []
        reproduce(ReproduceRequest("quick", str(out), families=("bert",), variants=("vanilla", "clipped"), max_steps=2,
                                   progress=False, released=False), echo=lines.append).write(out)
        assert not (run_dir / "train").exists() and not (run_dir / "result.json").exists()  # not touched
        assert (out / "runs" / "bert-clipped-s0" / "result.json").exists()  # the free run was trained
        res = json.loads((out / "results.json").read_text())
        assert [r["name"] for r in res["runs"]] == ["bert-clipped-s0"]
        assert res["meta"]["missing"] == {spec.name: f"training by pid {p.pid}, started, no checkpoint yet "
                                                     f"(of 2 steps)"}
        assert any("bert-vanilla-s0: left to another process" in line for line in lines)
        # --report-only, beside the holder, says the same
        reproduce(ReproduceRequest("quick", str(out), families=("bert",), variants=("vanilla", "clipped"), max_steps=2,
                                   progress=False, report_only=True, released=False), echo=quiet).write(out)
        assert json.loads((out / "results.json").read_text())["meta"]["missing"][spec.name].startswith(
            f"training by pid {p.pid}")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    # the holder died: the run is free, and the next command trains it
    assert run_status(spec, run_dir) == "started, no checkpoint yet (of 2 steps)"
    reproduce(ReproduceRequest("quick", str(out), families=("bert",), variants=("vanilla", "clipped"), max_steps=2,
                               progress=False, released=False), echo=quiet).write(out)
    res = json.loads((out / "results.json").read_text())
    assert sorted(r["name"] for r in res["runs"]) == ["bert-clipped-s0", "bert-vanilla-s0"]
    assert res["meta"]["missing"] == {}


def test_two_processes_into_one_out_train_each_run_exactly_once(tmp_path):
    """The way a new user meets it: the same command started twice, at once, into one --out."""
    out = tmp_path / "o"
    args = [sys.executable, "-m", "outlierfree", "reproduce", "--preset", "quick", "--families", "bert",
            "--max-steps", "3", "--no-released", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    names = [s.name for s in PRESETS["quick"].runs(("bert",), None, None, 3)]
    trained = [line for o, _ in outputs for line in o.splitlines() if ": training tiny for" in line]
    assert sorted(line.split(": ")[0].split("] ")[1] for line in trained) == sorted(names)  # each exactly once
    for name in names:
        log = (out / "runs" / name / "train" / "log.jsonl").read_text().splitlines()
        starts = [json.loads(line)["event"] for line in log if '"event": "start"' in line or '"resume"' in line]
        assert starts == ["start"], (name, starts)  # one training process, never a second start or a resume
        assert (out / "runs" / name / "result.json").exists() and lock_holder(out / "runs" / name) is None
