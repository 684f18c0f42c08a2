"""Real processes for end-to-end tests: a `manage.py qcluster` on the test database.

The cluster is a child process of its own session, pointed at pytest-django's test database
(which a test must commit to: `transactional_db` or `live_server`) and at the same Redis
database as the test, with short leases and a fast `echo-slow`, so a dead worker is noticed
in under two seconds.

Nothing here sleeps for a fixed time to decide an outcome: `wait_until` polls a condition
until a deadline and fails with a message that says what never happened.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import pytest
from django.conf import settings

from messaging.models import WorkerHeartbeat

MANAGE_PY = Path(__file__).resolve().parent.parent / "manage.py"

# Fast enough that a killed worker's message is taken up again within two seconds, slow
# enough that a 30-word `echo-slow` message is still running when a test acts on it. The
# lease is still six renewals long: a loaded machine must not make a live worker look dead.
LEASE_SECONDS = 1.5
RECOVERY_INTERVAL = 0.25
FAST_SETTINGS = {
    "MESSAGING_LEASE_SECONDS": str(LEASE_SECONDS),
    "MESSAGING_RECOVERY_INTERVAL": str(RECOVERY_INTERVAL),
    "MESSAGING_ECHO_SLOW_DELAY": "0.05",
    "MESSAGING_CHECK_INTERVAL": "0.1",
    "MESSAGING_WORKERS": "1",
    # A stopped cluster hands its unfinished messages back after this long.
    "MESSAGING_DRAIN_SECONDS": "2",
}
STOP_TIMEOUT = 20.0

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    """Poll `predicate` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def url_of_test_database() -> str:
    """The test database, as a DATABASE_URL another process can use. Inside a test that has a
    database, settings.DATABASES already names the test database."""
    database = settings.DATABASES["default"]
    engine = database["ENGINE"]
    if engine == "django.db.backends.sqlite3":
        return f"sqlite:///{Path(database['NAME']).resolve()}"
    if engine == "django.db.backends.postgresql":
        user = quote(database.get("USER") or "", safe="")
        password = quote(database.get("PASSWORD") or "", safe="")
        credentials = f"{user}:{password}@" if password else f"{user}@" if user else ""
        host = database.get("HOST") or "127.0.0.1"
        port = database.get("PORT") or 5432
        return f"postgres://{credentials}{host}:{port}/{quote(database['NAME'], safe='')}"
    raise NotImplementedError(f"no DATABASE_URL for {engine}")


def flush_broker() -> None:
    """Tokens left in Redis by an earlier test would claim this test's messages at the wrong
    moment. (The ORM broker's queue is a table, emptied with the rest of the test database.)"""
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        try:
            client.flushdb()
        finally:
            client.close()


def _processes() -> Iterator[tuple[int, int, int]]:
    """(pid, ppid, process group) of every live process; zombies are left out, since a
    container's init may never reap them. (/proc/<pid>/task/*/children is not compiled into
    every kernel; stat always has these.)"""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: fields start after the last ")".
        state, ppid, group = stat.rsplit(")", 1)[1].split()[:3]
        if state not in ("Z", "X"):
            yield int(entry), int(ppid), int(group)


def _children(pid: int) -> list[int]:
    return [child for child, parent, _ in _processes() if parent == pid]


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A child in the project directory, logging to `log_path`, in its own process group: a
    last-resort kill can take all its processes and nothing of pytest's."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            cwd=MANAGE_PY.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


class Cluster:
    """A running `manage.py qcluster`; its log (stderr) goes to `log_path`."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self.stop_timeout = STOP_TIMEOUT
        self.process = spawn([sys.executable, str(MANAGE_PY), "qcluster"], env, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> set[int]:
        """The live worker processes: descendants that wrote a heartbeat (only workers do)."""
        host = socket.gethostname()
        beating = {
            int(name.rsplit(":", 1)[1])
            for name in WorkerHeartbeat.objects.values_list("name", flat=True)
            if name.rsplit(":", 1)[0] == host
        }
        return beating & _descendants(self.pid)

    def worker_running(self, message_id: str, attempt: int, timeout: float = 30.0) -> int:
        """The pid of the worker that took up `message_id` for `attempt`, from the line
        the runner logs when it starts a message."""
        pattern = re.compile(rf"message {re.escape(message_id)} attempt {attempt} started in worker process (\d+)")

        def find() -> int | None:
            match = pattern.search(self.log())
            return int(match.group(1)) if match else None

        return wait_until(find, timeout=timeout, what=f"attempt {attempt} of {message_id} to start; log:\n{self.log()}")

    def kill_worker(self, pid: int) -> None:
        assert pid in _descendants(self.pid), f"{pid} is not a process of this cluster"
        os.kill(pid, signal.SIGKILL)
        # A worker killed while waiting for its next task dies holding the lock of django-q2's
        # task queue (django-q2 issue #23): its replacement then never reads the STOP that a
        # SIGTERM sends, and the cluster cannot stop. Its runner still claims and runs messages.
        self.stop_timeout = 3.0

    def kill(self) -> None:
        """SIGKILL every process of the cluster at once: a crash, an OOM kill, a container
        killed after its grace period."""
        self._kill_group()
        self.process.wait()
        wait_until(lambda: not self._group_alive(), timeout=5, what="the killed cluster's processes to exit")

    def stop(self) -> None:
        """SIGTERM to the main process only (signalling the group can hang it); the group is
        killed only if the cluster does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.process.wait()
        # The main process may be gone while a worker it lost track of lives on, holding a
        # database connection (PostgreSQL then refuses to drop the test database).
        try:
            wait_until(lambda: not self._group_alive(), timeout=5, what="the cluster's processes to exit")
        except AssertionError:
            self._kill_group()

    def _group_alive(self) -> bool:
        return any(group == self.pid for _, _, group in _processes())

    def _kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cluster_env(**overrides: Any) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FAST_SETTINGS)
    env.update(
        {
            "DATABASE_URL": url_of_test_database(),
            "DATA_DIR": str(settings.DATA_DIR),
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if settings.REDIS_URL:
        env["REDIS_URL"] = settings.REDIS_URL
    else:
        env.pop("REDIS_URL", None)
    env.update({name: str(value) for name, value in overrides.items()})
    return env


@pytest.fixture
def broker() -> Iterator[None]:
    flush_broker()
    yield
    flush_broker()


P = TypeVar("P", "Cluster", "Server")


def _starter(kind: Callable[[dict[str, str], Path], P], name: str, tmp_path: Path) -> Iterator[Callable[..., P]]:
    started: list[P] = []
    # The processes of one test count their metrics together, as one machine's do, and apart
    # from this test process's and other tests'.
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir(exist_ok=True)

    def start(**overrides: Any) -> P:
        env = cluster_env(**{"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **overrides})
        process = kind(env, tmp_path / f"{name}-{len(started) + 1}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def start_cluster(transactional_db: None, broker: None, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """`start_cluster(MESSAGING_WORKERS=2, ...)` starts a cluster with these settings on top of
    FAST_SETTINGS; every cluster started is stopped after the test."""
    yield from _starter(Cluster, "qcluster", tmp_path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """The ASGI server as the README runs it (uvicorn, httptools), on the test database."""

    def __init__(self, env: dict[str, str], log_path: Path, workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process = spawn(
            [
                sys.executable, "-m", "uvicorn", "project.asgi:application",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
                "--http", "httptools", "--loop", "uvloop", "--no-access-log",
            ],
            env,
            log_path,
        )
        wait_until(self._answers, timeout=30, what=f"the server to answer; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited; log:\n{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def start_server(transactional_db: None, broker: None, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """`start_server(MESSAGING_PING_INTERVAL="0.2", ...)` starts an ASGI server with these
    settings on top of FAST_SETTINGS; every server started is stopped after the test."""
    yield from _starter(Server, "server", tmp_path)
