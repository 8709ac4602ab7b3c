"""How commands end when they are stopped, race each other or fail half-way: real processes, real signals
(os.kill / os.killpg, as `kill` and a terminal's Ctrl-C send them), real gloo ranks, a real sqlite MLflow store.

- every MLflow run a command opens ends FINISHED, FAILED or KILLED: SIGTERM, Ctrl-C, a user error after
  the run started, a rank killed under the launcher, the demo's parent run;
- an interrupted `mtu data synth` prints one line, no worker traceback, and leaves no staging folder; a
  later run removes the staging folder of a writer killed outright and keeps a live writer's;
- a run folder is claimed by one run: a concurrent one (even with --overwrite, even on 2 ranks) fails with
  one line naming the folder and the holder, and the first run's results stay intact;
- two commands started together on a new store both work (the schema is created once, under a lock), and
  a run whose MLflow run cannot be created leaves no run folder behind.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import BIN, ROOT, accelerate_launch

TINY = ROOT / "configs" / "tiny.yaml"
# another live process holding a lock file: flock, as mtu's own holders do, so the OS releases it on exit
HOLD = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
    "os.write(fd, f'pid {os.getpid()} on elsewhere'.encode()); print('held', flush=True); time.sleep(600)"
)


def train_args(root: Path, out: Path, db: Path, name: str, *extra) -> list[str]:
    return [
        "train",
        "--config",
        str(TINY),
        "--set",
        f"data.root={root}",
        "--set",
        "data.dataset=synth-indoor",
        "--set",
        f"out={out}",
        "--tracking-uri",
        f"sqlite:///{db}",
        "--name",
        name,
        *extra,
    ]


def start(args: list, cwd: Path, env=None) -> subprocess.Popen:
    """`mtu ARGS` in its own process group (as a shell job is), so a test can signal the group like Ctrl-C.

    The signals are given back as a terminal's foreground job has them (`as_foreground_job`)."""
    return subprocess.Popen(
        [str(BIN / "mtu"), *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=as_foreground_job,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def as_foreground_job() -> None:
    """In the child, before exec: SIGINT, SIGTERM and SIGHUP at their defaults and unblocked. A suite run by
    a job runner can inherit them *ignored* (a background job of a non-interactive shell ignores SIGINT) or
    *blocked* (a mask survives fork and exec); Python then never turns Ctrl-C into KeyboardInterrupt, the
    command runs to the end, and the interrupt cases would test the runner instead of mtu."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    for sig in sigs:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


def runs(db: Path) -> dict[str, str]:
    """run name -> status, straight from the store's sqlite file."""
    if not db.is_file():
        return {}
    with sqlite3.connect(db) as con:
        try:
            return dict(con.execute("SELECT name, status FROM runs"))
        except sqlite3.OperationalError:  # tables not created yet
            return {}


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"ended before {what}:\n{proc.stderr.read()[-3000:]}")
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


def one_line_end(proc: subprocess.Popen, rc: int, line: str) -> str:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == rc, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert [x for x in err.splitlines() if x.startswith("mtu:")] == [line], err[-3000:]
    return err


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------- item 6: every run ends ----------------


@pytest.mark.slow
def test_a_run_stopped_by_ctrl_c_ends_killed_in_mlflow(tiny_root, tmp_path):
    """Ctrl-C reaches the whole process group (the data loader's workers too). SIGTERM: the demo test below."""
    db = tmp_path / "mlflow.db"
    proc = start(train_args(tiny_root, tmp_path / "runs", db, "stopped", "--set", "train.epochs=200"), tmp_path)
    wait_for(lambda: runs(db).get("stopped") == "RUNNING", proc, "the MLflow run")
    time.sleep(1)  # into the training loop
    os.killpg(proc.pid, signal.SIGINT)
    one_line_end(proc, 130, "mtu: interrupted")
    assert runs(db) == {"stopped": "KILLED"}


# The stop lands while torch's multi-worker iterator is half built (right after its first worker queue is
# made): an iterator stopped there has no `_shutdown` yet and its __del__ printed a traceback.
HALF_BUILT = """
import os, signal, sys
import torch
from mtu_dist.data.manifest import load_manifest
from mtu_dist.data.stream import BatchLoader
from mtu_dist.utils.lifecycle import Terminated, raise_on_termination

raise_on_termination()
real_queue = torch.multiprocessing.Queue
def queue_then_stop(*a, **k):
    os.kill(os.getpid(), signal.{sig})
    return real_queue(*a, **k)
torch.multiprocessing.Queue = queue_then_stop
loader = BatchLoader(load_manifest(sys.argv[1]), "train", rank=0, world=1, local_batch=8, workers=2)
try:
    for _ in loader.epoch(0):
        print("mtu: a batch was read", file=sys.stderr)
except (KeyboardInterrupt, Terminated):
    print("mtu: stopped", file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_while_the_loader_workers_start_waits_for_them_and_prints_one_line(tiny_root, tmp_path, sig):
    script = tmp_path / "half_built.py"
    script.write_text(HALF_BUILT.format(sig=sig))
    proc = subprocess.Popen(
        [str(BIN / "python"), str(script), str(tiny_root / "synth-indoor")],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_foreground_job,
    )
    err = one_line_end(proc, 3, "mtu: stopped")
    assert "Exception ignored" not in err, err


# The stop lands inside a finalizer (as when the garbage collector runs one of sqlalchemy's weakref callbacks
# under MLflow): Python prints it as "Exception ignored" and drops it, and the command went on to the end.
IN_A_FINALIZER = """
import os, signal, sys, time
from mtu_dist.utils.lifecycle import Terminated, raise_on_termination

raise_on_termination()
class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.{sig})
        for _ in range(10_000):  # the handler runs here, inside the finalizer
            pass
try:
    Finalized()
    t0 = time.time()
    while time.time() - t0 < 20:
        pass
    print("mtu: went on", file=sys.stderr)
except (KeyboardInterrupt, Terminated):
    print("mtu: stopped", file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_dropped_in_a_finalizer_is_sent_again(tmp_path, sig):
    script = tmp_path / "in_a_finalizer.py"
    script.write_text(IN_A_FINALIZER.format(sig=sig))
    proc = subprocess.Popen(
        [str(BIN / "python"), str(script)],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_foreground_job,
    )
    err = one_line_end(proc, 3, "mtu: stopped")
    assert "Exception ignored" not in err, err


@pytest.mark.slow
def test_a_killed_rank_ends_rank0s_run(tiny_root, tmp_path):
    """Rank 1 dies hard in training (MTU_FAULT: os._exit, like kill -9); the launcher stops rank 0, whose
    MLflow run must not stay RUNNING."""
    db = tmp_path / "mlflow.db"
    proc = accelerate_launch(
        ["-m", "mtu_dist.cli", *train_args(tiny_root, tmp_path / "runs", db, "ranked", "--set", "data.workers=1")],
        nproc=2,
        cwd=tmp_path,
        env={"MTU_FAULT": "train:2:1"},
        check=False,
        timeout=300,
    )
    assert proc.returncode != 0
    assert runs(db).get("ranked") in ("FAILED", "KILLED"), (runs(db), proc.stderr[-3000:])


@pytest.mark.slow
def test_the_demo_parent_run_ends_with_its_child(tiny_root, tmp_path):
    db = tmp_path / "mlflow.db"
    proc = start(
        ["demo", "--root", tiny_root, "--out", tmp_path / "runs", "--tracking-uri", f"sqlite:///{db}"], tmp_path
    )
    wait_for(lambda: runs(db).get("original") == "RUNNING", proc, "the demo's first child run")
    os.kill(proc.pid, signal.SIGTERM)
    one_line_end(proc, 143, "mtu: terminated")
    assert runs(db) == {"demo": "KILLED", "original": "KILLED"}


# ---------------- item 7: interrupts and staging folders ----------------

SYNTH = [
    "data",
    "synth",
    "--datasets",
    "synth-indoor",
    "--train",
    4000,
    "--val",
    0,
    "--height",
    16,
    "--width",
    24,
    "--shard-size",
    8,
    "--workers",
    2,
]


@pytest.mark.parametrize(
    "sig,group,rc,line",
    [
        (signal.SIGTERM, False, 143, "mtu: terminated"),
        (signal.SIGTERM, True, 143, "mtu: terminated"),
        (signal.SIGINT, True, 130, "mtu: interrupted"),
    ],
    ids=["sigterm", "sigterm-group", "ctrl-c"],
)
def test_interrupted_synth_ends_in_one_line_and_removes_staging(tmp_path, sig, group, rc, line):
    out = tmp_path / "shards"
    proc = start([*SYNTH, "--out", out], tmp_path)
    wait_for(lambda: any(out.glob(".synth-indoor.staging-*/train-000003.tar")), proc, "shards in staging")
    (os.killpg if group else os.kill)(proc.pid, sig)
    one_line_end(proc, rc, line)
    time.sleep(0.5)  # the workers are gone too
    assert list(out.iterdir()) == []


def test_staging_of_a_killed_writer_is_removed_by_the_next_run_and_a_live_ones_kept(tmp_path):
    out = tmp_path / "shards"
    proc = start([*SYNTH, "--out", out], tmp_path)
    wait_for(lambda: any(out.glob(".synth-indoor.staging-*/train-000001.tar")), proc, "shards in staging")
    os.kill(proc.pid, signal.SIGKILL)  # `kill -9 PID`: no cleanup runs; its orphaned workers must not keep it locked
    proc.communicate()
    stale = list(out.glob(".synth-indoor.staging-*"))
    assert len(stale) == 1
    live = out / ".synth-street.staging-1"  # a writer alive elsewhere holds its staging folder's lock
    live.mkdir()
    holder = subprocess.Popen(
        [str(BIN / "python"), "-c", HOLD, str(live / ".owner.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        small = [*SYNTH[:4], "--train", 16, "--val", 0, "--height", 16, "--width", 24, "--workers", 1, "--out", out]
        done = subprocess.run([str(BIN / "mtu"), *map(str, small)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not stale[0].exists(), "the killed writer's staging folder is still there"
        assert live.is_dir(), "a live writer's staging folder was removed"
    finally:
        holder.kill()
        holder.wait()


# ---------------- item 8: one run per run folder ----------------


@pytest.mark.slow
def test_two_runs_into_one_folder_cannot_both_win(tiny_root, tmp_path):
    db, out = tmp_path / "mlflow.db", tmp_path / "runs"
    # long enough to still hold the folder when the second command, started after it is RUNNING, gets there
    # (on a loaded machine 6 epochs ended first, and the second then rightly overwrote a finished run)
    first = start(train_args(tiny_root, out, db, "race", "--set", "train.epochs=30"), tmp_path)
    run = out / "synth-indoor" / "race"
    wait_for(lambda: runs(db).get("race") == "RUNNING", first, "the first run")
    second = subprocess.run(
        [str(BIN / "mtu"), *train_args(tiny_root, out, db, "race", "--overwrite")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    first_out, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [x for x in second.stderr.splitlines() if x.startswith("mtu:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert str(run) in errors[0] and "in use" in errors[0] and f"pid {first.pid}" in errors[0], errors[0]
    assert runs(db) == {"race": "FINISHED"}  # one run, the first's
    assert (run / "final" / "metrics.json").is_file() and (run / "checkpoints").is_dir()


@pytest.mark.slow
def test_a_held_run_folder_fails_every_rank_cleanly(tiny_root, tmp_path):
    """Two ranks into a folder another process holds: both stop (no rank waits alone in a collective), one
    line each, the folder untouched."""
    run = tmp_path / "runs" / "synth-indoor" / "held"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("kept: true\n")
    holder = subprocess.Popen([str(BIN / "python"), "-c", HOLD, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        proc = accelerate_launch(
            ["-m", "mtu_dist.cli", *train_args(tiny_root, tmp_path / "runs", tmp_path / "m.db", "held", "--overwrite")],
            nproc=2,
            cwd=tmp_path,
            check=False,
            timeout=180,
        )
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    errors = [x for x in proc.stderr.splitlines() if x.startswith("mtu: error:")]
    # the launcher stops the other rank once one has exited, so it may not get to print its line
    assert errors and all("in use" in e and f"pid {holder.pid}" in e for e in errors), proc.stderr[-3000:]
    # the launcher's own traceback (ChildFailedError) is how it says a rank failed; no frame may be mtu's
    assert "/mtu_dist/" not in proc.stderr, proc.stderr[-3000:]
    assert snapshot(run) == before


# ---------------- item 10: a new store, two commands at once ----------------


@pytest.mark.slow
def test_two_trains_at_once_on_a_new_store_and_a_run_killed_outright(tiny_root, tmp_path):
    """Both get through the store's creation (one then dies hard on purpose, after step 4: MTU_FAULT, an
    os._exit like kill -9, which leaves nothing in the process to end its run). The next run of that folder
    holds its lock, so it knows the first is gone: it ends its MLflow run KILLED and removes its half-written
    checkpoint temporaries (a write killed between its two renames is kept: it may be all there is)."""
    db, out = tmp_path / "new" / "mlflow.db", tmp_path / "runs"
    db.parent.mkdir()
    hard = train_args(tiny_root, out, db, "hard", "--set", "train.checkpoint_every=2")
    procs = [start(train_args(tiny_root, out, db, "a"), tmp_path), start(hard, tmp_path, env={"MTU_FAULT": "train:4"})]
    for p, rc in zip(procs, (0, 137)):
        _, err = p.communicate(timeout=300)
        assert p.returncode == rc and "Traceback" not in err, err[-3000:]
    assert runs(db) == {"a": "FINISHED", "hard": "RUNNING"}

    ckpts = out / "synth-indoor" / "hard" / "checkpoints"
    torn = ckpts / ".step-0000099.tmp-4242"
    between = [ckpts / ".step-0000098.tmp-4243", ckpts / ".step-0000098.old-4243"]
    for d in (torn, *between):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    resumed = subprocess.run(
        [str(BIN / "mtu"), *hard, "--resume"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with sqlite3.connect(db) as con:
        assert sorted(con.execute("SELECT name, status FROM runs")) == [
            ("a", "FINISHED"),
            ("hard", "FINISHED"),
            ("hard", "KILLED"),
        ]
    assert not torn.exists() and all(d.is_dir() for d in between)


class _HealthOnly(http.server.BaseHTTPRequestHandler):
    """Says it is healthy, then refuses every API call: the MLflow run cannot be created."""

    def do_GET(self):
        ok = self.path.rstrip("/").endswith("/health")
        self.send_response(200 if ok else 403)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"forbidden")

    do_POST = do_GET

    def log_message(self, *_):
        pass


@pytest.mark.slow
def test_a_run_whose_mlflow_run_cannot_be_created_leaves_no_folder(tiny_root, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        args = train_args(tiny_root, tmp_path / "runs", tmp_path / "unused.db", "nostore")
        args[args.index("--tracking-uri") + 1] = uri
        proc = subprocess.run([str(BIN / "mtu"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("mtu: error:")]
    assert len(errors) == 1 and uri in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "runs" / "synth-indoor" / "nostore").exists()


# ---------------- a driver's children (sweep cells) ----------------

CHILD = (
    "import signal, sys, time; from pathlib import Path; out = Path(sys.argv[1]); "
    "signal.signal(signal.SIGTERM, lambda *_: (out.write_text('ended cleanly'), sys.exit(143))); "
    "out.write_text('ready'); time.sleep(120)"
)
DRIVER = (
    "import sys; from mtu_dist.utils.lifecycle import raise_on_termination, run_child; raise_on_termination(); "
    "sys.exit(run_child([sys.executable, '-c', sys.argv[1], sys.argv[2]], grace_s=30))"
)


def test_a_terminated_driver_lets_its_child_end_cleanly(tmp_path):
    """`mtu sweep` runs each cell as a child: terminated, it passes SIGTERM on and waits for the cell to end
    its runs (subprocess.run would SIGKILL it, leaving them RUNNING and a launcher's ranks orphaned)."""
    marker = tmp_path / "child"
    driver = subprocess.Popen(
        [str(BIN / "python"), "-c", DRIVER, CHILD, str(marker)],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_foreground_job,
    )
    wait_for(lambda: marker.is_file() and marker.read_text() == "ready", driver, "the child")
    driver.send_signal(signal.SIGTERM)
    driver.communicate(timeout=60)
    assert driver.returncode != 0
    assert marker.read_text() == "ended cleanly"
