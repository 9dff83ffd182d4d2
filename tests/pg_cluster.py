"""A throwaway PostgreSQL 15 cluster for the tests: a temp directory, a loopback port,
PL/Python, pg_cron preloaded (with background workers), pgvector if installed.
IMGSIM_TEST_DSN, when set, names an existing server to use instead."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")
DATABASE = "imgsim_test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(args, **kw):
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + [str(a) for a in args], check=True, capture_output=True,
                          text=True, **kw)


class Cluster:
    def __init__(self):
        if not (BIN / "initdb").is_file():
            raise RuntimeError("PostgreSQL 15 is not installed: run tests/install_postgres.sh "
                               "(make test does)")
        self.base = Path(tempfile.mkdtemp(prefix="imgsim-pg-"))
        os.chmod(self.base, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres")
        self.data = self.base / "data"
        self.port = _free_port()
        _as_postgres([BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres",
                      "-E", "UTF8", "--no-sync"])
        self._start()
        _as_postgres([BIN / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "postgres",
                      DATABASE])

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _start(self):
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
                   f"-c shared_preload_libraries=pg_cron -c cron.database_name={DATABASE} "
                   "-c cron.use_background_workers=on -c max_worker_processes=16 "
                   "-c fsync=off")
        _as_postgres([BIN / "pg_ctl", "-D", self.data, "-l", self.base / "log", "-w",
                      "-o", options, "start"])

    def standby(self) -> "Cluster":
        """A hot standby of this server, streaming its WAL: PostgreSQL's own replication,
        made with pg_basebackup, on another loopback port."""
        replica = Cluster.__new__(Cluster)
        replica.base = Path(tempfile.mkdtemp(prefix="imgsim-pg-standby-"))
        os.chmod(replica.base, 0o755)
        if os.geteuid() == 0:
            shutil.chown(replica.base, "postgres")
        replica.data, replica.port = replica.base / "data", _free_port()
        _as_postgres([BIN / "pg_basebackup", "-h", "127.0.0.1", "-p", self.port, "-U",
                      "postgres", "-D", replica.data, "-R", "-X", "stream", "-c", "fast"])
        replica._start()
        return replica

    def stop(self):
        try:
            _as_postgres([BIN / "pg_ctl", "-D", self.data, "-m", "immediate", "stop"])
        finally:
            time.sleep(0.2)
            shutil.rmtree(self.base, ignore_errors=True)
