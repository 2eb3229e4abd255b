"""A PostgreSQL server of our own on this machine, for the spend store: tests and `make run`.

`initdb` once into a directory, then `pg_ctl start` on 127.0.0.1 and a chosen port (no Unix
socket, trust authentication for local connections only). PostgreSQL refuses to run as root, so
as root the server runs as the `postgres` user that Debian's package creates, owning the
directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server programs are not installed here."""


def server_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise PostgresUnavailable(f"{name} not found (PostgreSQL's server programs: Debian's postgresql package)")
    return found


class LocalPostgres:
    """As root, `directory` is given to the `postgres` user, and must be reachable by it (under
    /tmp, not under a directory only root may enter)."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = Path(directory)
        self.data = self.directory / "data"
        self.port = port
        self._user = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "running as root and there is no 'postgres' user to run the server as"
                ) from None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        """As the server's user; a failure carries what the program said."""
        done = subprocess.run(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            user=self._user.pw_uid if self._user else None,
            group=self._user.pw_gid if self._user else None,
            cwd=self.directory,
        )
        if done.returncode:
            said = done.stdout.decode(errors="replace").strip()
            raise subprocess.CalledProcessError(done.returncode, args, f"{Path(args[0]).name}: {said[-2000:]}")

    def start(self) -> str:
        """Start the server (creating its cluster on first use); returns its connection string."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            os.chown(self.directory, self._user.pw_uid, self._user.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run(server_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories=''"
        self._run(
            server_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.directory / "server.log"),
            "-w", "-t", "60", "start",
        )  # fmt: skip
        return self.dsn

    def running(self) -> bool:
        if not (self.data / "PG_VERSION").exists():
            return False
        try:
            self._run(server_bin("pg_ctl"), "-D", str(self.data), "status")
        except subprocess.CalledProcessError:
            return False
        return True

    def stop(self) -> None:
        if self.data.exists():
            try:
                self._run(server_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
            except subprocess.CalledProcessError:
                pass  # not running
