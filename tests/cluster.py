"""A throwaway multi-node Ray cluster on this machine, for tests; it stops only what it started.

Other people run their own Ray clusters on the same machine, so `ray stop` (which kills every
Ray process of the user) is never an option. Instead every node gets its own ports, the cluster
its own `--temp-dir` and its own auth token, and each `ray start` runs with a marker variable in
its environment. The long-lived processes it leaves behind (gcs_server, raylet, dashboard,
log_monitor, ...) inherit that variable; the processes they spawn (workers, agents, dashboard
modules) overwrite their environment with `setproctitle`, so they are found as descendants of the
marked ones. A node's processes are: the marked ones and everything below them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from tests.support import free_port

BIN = Path(sys.executable).parent
MARKER = "TK_TEST_CLUSTER_NODE"


class LocalCluster:
    def __init__(self) -> None:
        # Short and private: Ray's unix sockets live under it (paths are limited to 107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="tkc-", dir="/tmp"))
        self.id = self.temp_dir.name
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        # Our own token, through RAY_AUTH_TOKEN (which Ray reads before ~/.ray/auth_token): the
        # shared file in the home directory belongs to whoever else runs Ray here.
        self.token = secrets.token_hex(32)
        self.env = {
            key: value
            for key, value in os.environ.items()
            # Never join, or deploy to, anybody else's cluster; never load another app config or
            # require client keys the test does not send.
            if key not in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS", "TOKEN_KILLER_CONFIG", "TOKEN_KILLER_API_KEYS")
        }
        self.env.update(
            RAY_AUTH_MODE="token",  # head, worker and every CLI call must agree (NOTES.md)
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
        )
        self.nodes: list[str] = []
        self._seen: set[psutil.Process] = set()  # every process ever found: stop() ends them all

    # ---- starting ------------------------------------------------------------------------

    def _node_ports(self) -> list[str]:
        # Every port a node opens, chosen free, so nodes cannot collide with each other or with
        # other clusters on the machine (the agents' defaults are fixed numbers).
        names = (
            "node-manager-port",
            "object-manager-port",
            "runtime-env-agent-port",
            "dashboard-agent-grpc-port",
            "dashboard-agent-listen-port",
            "metrics-export-port",
        )
        return [f"--{name}={free_port()}" for name in names]

    def _start(self, name: str, args: list[str]) -> None:
        env = {**self.env, MARKER: f"{self.id}:{name}"}
        self.nodes.append(name)  # before starting: a half-started node is stopped too
        self.ray(
            "start",
            f"--temp-dir={self.temp_dir}",
            "--node-ip-address=127.0.0.1",
            "--object-store-memory=100000000",  # not 30% of RAM per node
            "--disable-usage-stats",
            *self._node_ports(),
            *args,
            env=env,
            timeout=90,
        )

    def start_head(self, num_cpus: float, resources: dict[str, float]) -> None:
        self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--num-cpus={num_cpus}",
                f"--resources={json.dumps(resources)}",
            ],
        )

    def add_node(self, name: str, num_cpus: float, resources: dict[str, float]) -> None:
        self._start(
            name,
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                f"--num-cpus={num_cpus}",
                f"--resources={json.dumps(resources)}",
            ],
        )

    # ---- talking to it ---------------------------------------------------------------------

    def ray(self, *args: str, env: dict | None = None, timeout: float = 60) -> str:
        return self._run("ray", args, env, timeout)

    def serve(self, *args: str, timeout: float = 60) -> str:
        return self._run("serve", (*args, f"--address={self.dashboard_url}"), None, timeout)

    def _run(self, tool: str, args, env: dict | None, timeout: float) -> str:
        done = subprocess.run(
            [str(BIN / tool), *args],
            env=env or self.env,
            cwd=self.temp_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{tool} {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def dashboard(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> tuple[int, bytes, dict[str, str]]:
        """A dashboard request; `headers` None means with the token, as `Authorization`.

        Returns status, body and response headers.
        """
        if headers is None:
            headers = {"Authorization": f"Bearer {self.token}"}
        request = urllib.request.Request(self.dashboard_url + path, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, error.read(), dict(error.headers)

    # ---- processes -------------------------------------------------------------------------

    def processes(self, node: str | None = None) -> set[psutil.Process]:
        """Live processes of one node (or of every node): the marked ones and their descendants."""
        wanted = {f"{self.id}:{name}" for name in ([node] if node else self.nodes)}
        found: set[psutil.Process] = set()
        for process in psutil.process_iter():
            try:
                if process.environ().get(MARKER) in wanted:
                    found.add(process)
                    found.update(process.children(recursive=True))
            except psutil.Error:  # gone meanwhile, a zombie, or not ours to read
                pass
        self._seen |= found
        return {p for p in found if _alive(p)}

    def kill_node(self, node: str) -> list[int]:
        """SIGKILL a node's processes at once (raylet, workers, agents): a machine lost."""
        victims = self.processes(node)
        for process in victims:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(list(victims), timeout=10)
        return sorted(p.pid for p in victims)

    def stop(self, keep_files: bool = False) -> list[str]:
        """End every process this cluster started; returns descriptions of any still alive."""
        self.processes()  # refresh the set with whatever was started since
        # Anything that names our temp dir belongs to us too (belt and braces).
        for process in psutil.process_iter():
            try:
                if str(self.temp_dir) in " ".join(process.cmdline()):
                    self._seen.add(process)
            except psutil.Error:
                pass
        # SIGTERM first, so raylets end their workers; then SIGKILL for the rest (gcs_server
        # was measured to ignore SIGTERM for 10 s and more).
        for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            alive = [p for p in self._seen if _alive(p)]
            for process in alive:
                try:
                    process.send_signal(sig)
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=wait_s)
        left = [f"{p.pid} {p.name()}" for p in self._seen if _alive(p)]
        if not keep_files:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def _alive(process: psutil.Process) -> bool:
    """Running, and still the process we saw (pids get reused). Zombies count as gone."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_until(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; returns that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(interval_s)
