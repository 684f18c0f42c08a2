"""`./scripts/serve` as a newcomer runs it: a real run in a process group of its own, on a port
of the test's choosing and a fresh DATA_DIR, stopped (and its group killed) at the end.

The venv exists already in a test run, so a start takes seconds: migrate, collectstatic, the
web server and a worker cluster."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.processes import _processes, free_port, wait_until

pytestmark = pytest.mark.e2e

SERVE = Path(__file__).resolve().parent.parent / "scripts" / "serve"
BANNER = "The service is running"
START_TIMEOUT = 120.0


class Serve:
    def __init__(self, data_dir: Path, port: int, log_dir: Path, **overrides: str):
        self.port = port
        self.stdout_path = log_dir / f"serve-{len(list(log_dir.glob('serve-*.out'))) + 1}.out"
        self.stderr_path = self.stdout_path.with_suffix(".err")
        env = dict(os.environ)
        # The suite's own store and key stay out of it: serve makes its own in DATA_DIR.
        for name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DJANGO_SETTINGS_MODULE"):
            env.pop(name, None)
        env.update(DATA_DIR=str(data_dir), PORT=str(port), HOST="127.0.0.1", WEB_WORKERS="1", MESSAGING_WORKERS="1")
        env.update(overrides)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [str(SERVE)], env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for_banner_or_exit(self) -> None:
        wait_until(
            lambda: BANNER in self.stdout() or self.process.poll() is not None,
            timeout=START_TIMEOUT,
            interval=0.1,
            what=f"scripts/serve to start or exit; stdout:\n{self.stdout()}\nstderr:\n{self.stderr()}",
        )

    def wait_for_exit(self) -> int:
        wait_until(lambda: self.process.poll() is not None, timeout=START_TIMEOUT, interval=0.1,
                   what=f"scripts/serve to exit; stdout:\n{self.stdout()}\nstderr:\n{self.stderr()}")
        return self.process.returncode

    def api_key(self) -> str:
        lines = self.stdout().splitlines()
        return next(lines[i + 2].strip() for i, line in enumerate(lines) if "Your API key" in line)

    def stop(self) -> None:
        """Ctrl-C's path (the script stops its web server and cluster), then the whole group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        wait_until(lambda: not any(group == self.process.pid for _, _, group in _processes()),
                   timeout=10, what="scripts/serve's processes to exit")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """`serve(data_dir, port, **env)` starts scripts/serve; every run is stopped after the test."""
    started: list[Serve] = []

    def start(data_dir: Path, port: int, **overrides: str) -> Serve:
        started.append(Serve(data_dir, port, tmp_path, **overrides))
        return started[-1]

    yield start
    for run in started:
        run.stop()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port held by another server that answers /healthz with 200, as a second instance of
    the service would."""

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def get(url: str, key: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def test_a_busy_port_fails_at_once_with_a_clear_message_and_no_banner(serve: Callable[..., Serve], busy_port: int, tmp_path: Path) -> None:
    run = serve(tmp_path / "data", busy_port)

    assert run.wait_for_exit() != 0
    assert BANNER not in run.stdout()
    assert f"port {busy_port} on 127.0.0.1 is already in use" in run.stderr()
    # It failed before doing anything: no database, no key made.
    assert not (tmp_path / "data" / "db.sqlite3").exists()


def test_a_web_server_that_dies_at_start_up_gets_no_banner(serve: Callable[..., Serve], tmp_path: Path) -> None:
    run = serve(tmp_path / "data", free_port(), WEB_WORKERS="many")

    assert run.wait_for_exit() != 0
    assert BANNER not in run.stdout()
    assert "the web server exited before it answered" in run.stderr()


def test_it_reuses_its_secret_key_and_its_api_key_at_every_start(serve: Callable[..., Serve], tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()

    first = serve(data_dir, port)
    first.wait_for_banner_or_exit()
    assert BANNER in first.stdout(), first.stderr()
    key = first.api_key()
    assert get(f"http://127.0.0.1:{port}/v1/models", key) == 200
    secret = (data_dir / "secret_key").read_text()
    first.stop()

    second = serve(data_dir, port)
    second.wait_for_banner_or_exit()
    assert BANNER in second.stdout(), second.stderr()

    assert second.api_key() == key
    assert get(f"http://127.0.0.1:{port}/v1/models", key) == 200
    assert (data_dir / "secret_key").read_text() == secret
    assert len(secret.strip()) >= 50
    for kept in ("secret_key", "dev_api_key"):
        assert stat.S_IMODE((data_dir / kept).stat().st_mode) == 0o600, kept



def test_scripts_manage_runs_manage_py_on_what_serve_uses(tmp_path: Path) -> None:
    """`./scripts/manage createsuperuser` after `./scripts/serve`: same DATA_DIR, same key."""
    env = {name: value for name, value in os.environ.items() if name not in ("SECRET_KEY", "DATABASE_URL", "REDIS_URL")}
    env["DATA_DIR"] = str(tmp_path)

    runs = [
        subprocess.run([str(SERVE.with_name("manage")), "check"], env=env, capture_output=True, text=True, timeout=120)
        for _ in range(2)
    ]

    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr
    assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600
