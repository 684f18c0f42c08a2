"""Schemathesis against a live server: every operation of the served `/v1/schema`, bodies
included, must answer without a server error and as documented (status code, content type,
body schema).

A real ASGI server (uvicorn, as the README serves it) and a real `qcluster` run on the test
database, so accepted messages complete and their streams close. Per operation, Schemathesis
sends the documented examples, its coverage cases (boundary and wrong-type values for every
field) and `FUZZ_EXAMPLES` Hypothesis examples (valid and invalid data), then runs stateful
sequences linked by the `Location` header. The default suits every suite run (about 2,600
requests in 45 s); the README has the command for a larger run.

Schemathesis runs as its CLI: its pytest loader for a schema served by a fixture
(`schemathesis.pytest.from_fixture`) needs `Node._nodeid`, which pytest 9 removed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from messaging.models import APIKey
from tests.processes import Cluster, Server

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
# A fixed seed by default, so a suite run is repeatable; set FUZZ_SEED to explore elsewhere.
SEED = int(os.environ.get("FUZZ_SEED", "20261122"))
# The examples, coverage and stateful phases send about 2,500 requests in 40 s whatever
# FUZZ_EXAMPLES says; fuzzing adds about 0.3 s per example (all operations together).
RUN_TIMEOUT = 300 + EXAMPLES

pytestmark = [pytest.mark.fuzz, pytest.mark.e2e, pytest.mark.timeout(RUN_TIMEOUT + 60)]

CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance"]

# Both documented headers are configured (the client picks Bearer); the key comes from the
# environment. No example database: each run starts from its seed alone.
CONFIG = """
[generation]
database = "none"

[auth.openapi.BearerAuth]
bearer = "${FUZZ_API_KEY}"

[auth.openapi.ApiKeyAuth]
api_key = "${FUZZ_API_KEY}"
"""

SCHEMATHESIS = [sys.executable, "-m", "schemathesis.cli"]


def run_schemathesis(server: Server, key: str, workdir: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the CLI in `workdir` (its reports and caches land there); returns its HAR log."""
    (workdir / "schemathesis.toml").write_text(CONFIG)
    har = workdir / "requests.har"
    command = [
        *SCHEMATHESIS, "--no-color", "--config-file", str(workdir / "schemathesis.toml"),
        "run", f"{server.url}/v1/schema",
        "--checks", ",".join(CHECKS),
        "--max-examples", str(EXAMPLES),
        "--seed", str(SEED),
        "--workers", "1",
        "--request-timeout", "30",
        # Failures print as complete curl commands (the key is this test's own, thrown away).
        "--output-sanitize", "false",
        "--report", "har", "--report-har-path", str(har), "--report-dir", str(workdir),
    ]
    result = subprocess.run(
        command, cwd=workdir, env={**os.environ, "FUZZ_API_KEY": key}, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    return result, har


@dataclass
class Traffic:
    """What Schemathesis sent, per operation label ("POST /v1/messages"), from its HAR log."""

    sent: Counter[str] = field(default_factory=Counter)
    with_body: Counter[str] = field(default_factory=Counter)
    past_auth: Counter[str] = field(default_factory=Counter)  # answered other than 401


def traffic(schema: dict[str, Any], har: Path) -> Traffic:
    # Literal paths first, as the URLconf routes them: /v1/messages/async is not a message_id.
    templates = sorted(schema["paths"], key=lambda path: path.count("{"))
    routes = [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"), path) for path in templates]
    seen = Traffic()
    for entry in json.loads(har.read_text())["log"]["entries"]:
        method, path = entry["request"]["method"], httpx.URL(entry["request"]["url"]).path
        # The coverage phase also tries undocumented methods (405) and paths no route serves.
        label = f"{method} " + next((template for pattern, template in routes if pattern.match(path)), "(no such path)")
        seen.sent[label] += 1
        if entry["request"].get("postData", {}).get("text"):
            seen.with_body[label] += 1
        if entry["response"]["status"] != 401:
            seen.past_auth[label] += 1
    return seen


def test_every_request_is_answered_without_a_server_error_and_as_documented(
    start_server: Callable[..., Server], start_cluster: Callable[..., Cluster], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_server()
    start_cluster()
    key = APIKey.objects.create_key(name="fuzz", owner="fuzz")[1]
    schema = httpx.get(f"{server.url}/v1/schema", headers={"Accept": "application/vnd.oai.openapi+json"}).json()
    operations = {f"{m.upper()} {path}": op for path, ops in schema["paths"].items() for m, op in ops.items()}

    result, har = run_schemathesis(server, key, tmp_path)
    assert har.exists(), result.stdout + result.stderr
    seen = traffic(schema, har)

    with capsys.disabled():  # the figures, on every run
        print(f"\nfuzz: {sum(seen.sent.values())} requests (FUZZ_EXAMPLES={EXAMPLES}, FUZZ_SEED={SEED})")
        for label in sorted(operations, key=lambda label: label.split(" ", 1)[::-1]):
            bodies = f" ({seen.with_body[label]} with a body)" if label in seen.with_body else ""
            print(f"  {seen.sent[label]:6d}  {label}{bodies}")
        print(f"  {sum(n for label, n in seen.sent.items() if label not in operations):6d}  undocumented methods or paths")
    # A schema a generator cannot read (a dangling $ref) shows as operations left out or sent
    # without bodies, and a key the server refuses as nothing but 401s: none is a failure to it.
    assert all(seen.past_auth[label] for label in operations), seen.past_auth
    bodies = {label: seen.with_body[label] for label, operation in operations.items() if "requestBody" in operation}
    assert min(bodies.values()) >= EXAMPLES, f"requests with a body: {bodies}"
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in server.log(), server.log()
