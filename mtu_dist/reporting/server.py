"""`mtu server`: an MLflow tracking server for runs that span processes or machines.

It binds 127.0.0.1 unless `--host` says otherwise: the store holds every run's config and forget
request, and MLflow's server has no authentication, so reaching it from other machines is a choice the
user makes explicitly (`--host 0.0.0.0` on a trusted cluster network). The store and the port are
checked before anything starts, and a sqlite store that was moved is pointed at the artifact folder
beside it (tracking.relocate_artifacts); the process then becomes the MLflow server (exec), so signals
reach it directly.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from mtu_dist.errors import UserError
from mtu_dist.reporting.tracking import check_reachable, relocate_artifacts, sqlite_path, store_lock

DEFAULT_HOST = "127.0.0.1"


def check_port_free(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise UserError(f"--port {port}: expected 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(
                f"port {port} on {host}: cannot listen ({e.strerror or e}); "
                "another server holds it? pick another with --port"
            ) from None


def server_argv(*, store: str, artifacts: str, host: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store,
        "--artifacts-destination",
        str(Path(artifacts).resolve()),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def serve(*, store: str, artifacts: str, host: str = DEFAULT_HOST, port: int = 5000, workers: int = 1) -> None:
    if store.startswith(("http://", "https://")):
        raise UserError(
            f"--store {store}: a server needs a database store (e.g. sqlite:///mlflow.db), not another server"
        )
    check_reachable(store)
    if store.startswith("sqlite:///"):
        with store_lock(sqlite_path(store)):
            if relocate_artifacts(sqlite_path(store)):
                print(f"mtu: {store}: the store was moved; its runs' artifacts now point at the folder beside it")
    check_port_free(host, port)
    argv = server_argv(store=store, artifacts=artifacts, host=host, port=port, workers=workers)
    print(f"mtu: MLflow server on http://{host}:{port} (store {store}, artifacts {argv[7]})", flush=True)
    os.execv(argv[0], argv)
