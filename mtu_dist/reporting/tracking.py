"""MLflow tracking: embedded sqlite store by default, a server when asked; only rank 0 logs.

URI: `tracking.uri` (or `--tracking-uri`) > `MLFLOW_TRACKING_URI` > `sqlite:///<cwd>/mlflow.db`.
Metrics are buffered and sent with `log_batch` (one request per flush instead of one per point).
`mlflow` is imported lazily: it costs ~2 s and most processes (workers, non-zero ranks) never need it.

Curves are logged per step; a run's final scores at step 0 (`log_scores`), which MLflow's chart view
draws as one bar per run.

A sqlite store keeps its run artifacts in `mlartifacts/` beside `mlflow.db`. MLflow records them by
absolute path (it resolves a relative one against the current directory, not the store), so a store
that was moved or copied is pointed at its own folder again whenever it is opened here or served by
`mtu server` (`relocate_artifacts`).
"""

from __future__ import annotations

import os
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from mtu_dist.errors import UserError

FLUSH_EVERY = 200  # buffered metric points
ARTIFACTS = "mlartifacts"  # a sqlite store's artifact folder, beside mlflow.db
SCORE_STEP = 0  # MLflow's chart view draws a metric whose latest point has step >= 1 as a line, else as bars
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "databricks")  # other stores MLflow accepts


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """Fail before any work starts if the store cannot be used; the message names the URI."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except Exception as e:
            raise UserError(f"tracking URI {uri}: MLflow server unreachable ({e})") from None
    elif uri.startswith("sqlite:///"):
        db = sqlite_path(uri)
        folder = db.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UserError(f"tracking URI {uri}: folder {folder} does not exist or is not writable")
        with store_lock(db):  # not while another process is creating the store's tables
            _check_sqlite_store(uri, db)
    elif uri.startswith(("file:", "/", ".")):
        raise UserError(f"tracking URI {uri}: the file store is retired in MLflow 3; use sqlite:///path/mlflow.db")
    elif not uri.startswith(DATABASE_SCHEMES):
        raise UserError(
            f"tracking URI {uri}: unsupported scheme (expected sqlite:///path/mlflow.db, http(s)://host:port "
            f"or a database URI: {', '.join(DATABASE_SCHEMES)})"
        )


SQLITE_HEADER = b"SQLite format 3\x00"
MLFLOW_TABLES = {"experiments", "runs", "metrics", "params"}
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}  # the UI's "Model training" view


def _check_sqlite_store(uri: str, db: Path) -> None:
    """An existing file must be an SQLite database that is empty or already an MLflow store: MLflow would
    otherwise fail deep in its migrations, or add its tables to another program's database."""
    import sqlite3

    if not db.exists():
        return  # a new store: MLflow creates it
    if not db.is_file():
        raise UserError(f"tracking URI {uri}: {db} is not a file (expected sqlite:///path/mlflow.db)")
    try:
        with open(db, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
        if not head:
            return  # an empty file is an empty database to SQLite
        if head != SQLITE_HEADER:
            raise UserError(f"tracking URI {uri}: {db} is not an SQLite database, so not an MLflow store")
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except OSError as e:
        raise UserError(f"tracking URI {uri}: cannot read {db} ({e.strerror or e})") from None
    except sqlite3.Error as e:
        raise UserError(f"tracking URI {uri}: {db} is not a readable SQLite database ({e})") from None
    if tables and not MLFLOW_TABLES <= tables:
        raise UserError(
            f"tracking URI {uri}: {db} is an SQLite database of another program (tables: "
            f"{', '.join(sorted(tables)[:5])}), not an MLflow store"
        )


class Tracker:
    """One MLflow run (optionally the child of `parent_run_id`). A no-op where `enabled` is False.
    With `run_id`, an existing run is reopened to add to it (`mtu score`) instead of a new one made."""

    def __init__(
        self,
        *,
        enabled: bool,
        uri: str | None,
        experiment: str,
        run_name: str,
        parent_run_id: str | None = None,
        tags: dict | None = None,
        run_id: str | None = None,
    ):
        self.enabled, self.run_id, self._buffer = enabled, None, []
        if not enabled:
            return
        self.uri = resolve_uri(uri)
        check_reachable(self.uri)
        self.client = mlflow_client(self.uri)
        if run_id:
            self.run_id = self._existing(run_id)
            return
        from mlflow.exceptions import MlflowException

        try:
            self._create(experiment, run_name, parent_run_id, tags)
        except MlflowException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"tracking URI {self.uri}: could not create the MLflow run ({first[:300]})") from None

    def _create(self, experiment: str, run_name: str, parent_run_id: str | None, tags: dict | None) -> None:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                location = artifact_root(sqlite_path(self.uri))
            # MLflow's UI opens an experiment without this tag in its GenAI (traces) view; ours hold training runs
            exp_id = self.client.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
        else:
            exp_id = exp.experiment_id
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        _OPEN[self.run_id] = self  # ended by end_open_runs if the command stops before finish()

    def _existing(self, run_id: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.run_id
        except MlflowException:
            raise UserError(
                f"tracking URI {self.uri}: no MLflow run {run_id}; pass the --tracking-uri the run was logged to"
            ) from None

    def log_params(self, params: dict) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._buffer) >= FLUSH_EVERY:
            self.flush()

    def log_scores(self, metrics: dict[str, float]) -> None:
        """A run's final scores: one value each, at SCORE_STEP, so MLflow compares them across runs as bars
        (at the run's last training step they would be lines of a single dot)."""
        self.log_metrics(metrics, SCORE_STEP)

    def flush(self) -> None:
        if self.enabled and self._buffer:
            for i in range(0, len(self._buffer), 1000):
                self.client.log_batch(self.run_id, metrics=self._buffer[i : i + 1000])
            self._buffer = []

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), folder)

    def set_name(self, name: str) -> None:
        if self.enabled:
            self.client.update_run(self.run_id, name=name)

    def set_tags(self, tags: dict) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.flush()
            self.client.set_terminated(self.run_id, status)
            _OPEN.pop(self.run_id, None)


_OPEN: dict[str, Tracker] = {}  # runs this process opened and has not ended yet


def end_open_runs(status: str) -> None:
    """End every run this process opened and did not finish (a failure, Ctrl-C, SIGTERM): FAILED or KILLED
    instead of RUNNING forever. Children first, so a parent never ends before its children. Best effort:
    the store itself may be what failed, and the command's own error is the one to report."""
    for run_id, tracker in reversed(list(_OPEN.items())):
        try:
            tracker.client.set_terminated(run_id, status)
        except Exception:  # noqa: BLE001 - an unreachable store must not hide the command's error
            pass
        _OPEN.pop(run_id, None)


def mlflow_client(uri: str):
    """An MlflowClient on `uri`. A sqlite store is opened under a lock beside it: the first process to use
    a new store creates and migrates its schema, and two doing that at once fail (duplicate column)."""
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    db = sqlite_path(uri)
    with store_lock(db):
        client = MlflowClient(uri)  # builds (and caches, per process) the store: schema created or checked here
        relocate_artifacts(db)
        return client


def sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///") :].split("?")[0])


def artifact_root(db: Path) -> str:
    """The artifact location of every experiment this package creates in the sqlite store `db`."""
    return (db.parent / ARTIFACTS).resolve().as_uri()


def relocate_artifacts(db: Path) -> int:
    """Point a moved or copied sqlite store's experiments and runs at the artifact folder beside it; returns
    how many experiment locations changed. Only this package's layout is touched (an experiment location
    `file://.../mlartifacts`); MLflow has no API to change an experiment's location, so the rows are
    updated in SQL. Call under `store_lock(db)`."""
    import sqlite3

    if not db.is_file() or db.stat().st_size == 0:
        return 0
    root = artifact_root(db)
    con = sqlite3.connect(db, timeout=60)
    try:
        with con:  # one transaction: no reader sees experiments moved and their runs not
            if not con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'experiments'").fetchone():
                return 0
            stale = [
                row[0]
                for row in con.execute(
                    "SELECT DISTINCT artifact_location FROM experiments WHERE artifact_location LIKE ? "
                    "AND artifact_location != ?",
                    (f"file://%/{ARTIFACTS}", root),
                )
            ]
            for old in stale:
                con.execute(
                    "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE substr(artifact_uri, 1, ?) = ?",
                    (root, len(old) + 1, len(old) + 1, old + "/"),
                )
                con.execute("UPDATE experiments SET artifact_location = ? WHERE artifact_location = ?", (root, old))
    finally:
        con.close()
    return len(stale)


@contextmanager
def store_lock(db: Path):
    """`<db>.lock` beside a sqlite store, held while its schema may be created or read half-made."""
    from mtu_dist.utils.locks import release, wait_lock

    fd = wait_lock(db.with_name(db.name + ".lock"))
    try:
        yield
    finally:
        release(fd)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
