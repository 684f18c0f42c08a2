"""Clients generated from /v1/schema, as an integrator makes them: openapi-python-client (Python)
and openapi-typescript with openapi-fetch (TypeScript). Each generator reads the schema without a
warning and generates every operation with typed bodies and answers; a TypeScript client written
against the types passes `tsc --strict`; the Python client runs scripts/client_demo.py against a
real server and worker.

openapi-python-client comes from requirements.txt; the npm packages are installed on first use
into .cache/npm-generators (gitignored) at the versions below. A generator that cannot be
installed (no npm, a registry refusing) skips its tests, and says so in the run's summary.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from rest_framework.test import APIClient

from messaging.models import APIKey
from tests.processes import Cluster, Server

ROOT = Path(__file__).resolve().parent.parent
NPM_DIR = ROOT / ".cache" / "npm-generators"
# openapi-typescript 7 asks for TypeScript 5 (a peer dependency); 7.x is the native port.
NPM_PACKAGES = {"openapi-typescript": "7.13.0", "openapi-fetch": "0.17.0", "typescript": "5.9.3"}
PACKAGE = "messaging_api_client"  # what openapi-python-client names it, from the schema's title
TS_CLIENT = Path(__file__).with_name("generated_client.ts")


@dataclass
class Generated:
    output: str  # stdout and stderr together
    returncode: int
    seconds: float
    path: Path


def _run(command: list[str], *, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return result, time.monotonic() - started


def _skip_loudly(config: pytest.Config, reason: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nSKIPPING GENERATED CLIENT TESTS: {reason}", red=True, bold=True)
    pytest.skip(f"GENERATOR NOT INSTALLED: {reason}")


@pytest.fixture(scope="module")
def schema_file(django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The schema as the service serves it (GET /v1/schema), saved for the generators."""
    with django_db_blocker.unblock():
        response = APIClient().get("/v1/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    path = tmp_path_factory.mktemp("schema") / "schema.json"
    path.write_bytes(response.content)
    return path


@pytest.fixture(scope="module")
def schema(schema_file: Path) -> dict[str, Any]:
    return json.loads(schema_file.read_text())  # type: ignore[no-any-return]


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, operation) for path, methods in schema["paths"].items() for method, operation in methods.items()]


@pytest.fixture(scope="module")
def python_client(schema_file: Path, pytestconfig: pytest.Config) -> Generated:
    if importlib.util.find_spec("openapi_python_client") is None:
        _skip_loudly(pytestconfig, "openapi-python-client is not installed (requirements.txt pins it; ./scripts/test installs it)")
    output = schema_file.parent / PACKAGE
    # Its post-generation hook formats with ruff, a dependency of it, found on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(schema_file), "--meta", "none", "--output-path", str(output), "--fail-on-warning"]
    result, seconds = _run(command, cwd=schema_file.parent, env=env)
    return Generated(result.stdout + result.stderr, result.returncode, seconds, output)


def _npm_packages_installed() -> bool:
    for name, version in NPM_PACKAGES.items():
        manifest = NPM_DIR / "node_modules" / name / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text())["version"] != version:
            return False
    return True


@pytest.fixture(scope="module")
def npm_bin(pytestconfig: pytest.Config) -> Path:
    """node_modules/.bin with the pinned TypeScript generator, client and compiler."""
    if not _npm_packages_installed():
        npm = shutil.which("npm")
        if npm is None:
            _skip_loudly(pytestconfig, "npm is not on PATH, so openapi-typescript cannot be installed")
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        command = [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "--save-exact", *(f"{n}@{v}" for n, v in NPM_PACKAGES.items())]
        try:
            result, _ = _run(command, cwd=NPM_DIR, timeout=120)
        except subprocess.TimeoutExpired:
            _skip_loudly(pytestconfig, f"`npm install` of {NPM_PACKAGES} did not finish in 120 s")
        if result.returncode != 0 or not _npm_packages_installed():
            _skip_loudly(pytestconfig, f"`npm install` of {NPM_PACKAGES} failed:\n{result.stdout}{result.stderr}")
    return NPM_DIR / "node_modules" / ".bin"


@pytest.fixture(scope="module")
def typescript_types(schema_file: Path, npm_bin: Path) -> Generated:
    output = schema_file.parent / "typescript" / "schema.d.ts"
    output.parent.mkdir()
    result, seconds = _run([str(npm_bin / "openapi-typescript"), str(schema_file), "--output", str(output)], cwd=output.parent)
    return Generated(result.stdout + result.stderr, result.returncode, seconds, output)


# --- Python: openapi-python-client -----------------------------------------------------------


def test_openapi_python_client_reads_the_schema_without_a_warning(python_client: Generated) -> None:
    print(f"openapi-python-client: {python_client.seconds:.1f} s")

    assert python_client.returncode == 0, python_client.output
    assert "warning" not in python_client.output.lower(), python_client.output
    assert python_client.output.strip() == f"Generating {python_client.path}", python_client.output


def _component(schema: dict[str, Any], node: dict[str, Any] | None) -> dict[str, Any]:
    return schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]] if node and "$ref" in node else node or {}


def _python_types(schema: dict[str, Any], media: dict[str, Any]) -> set[str]:
    """The Python types a generated function returns for one response: the component's model,
    or each option of a union component (a text body read as `str`)."""
    ref = media["schema"]["$ref"].rsplit("/", 1)[1]
    options = schema["components"]["schemas"][ref].get("oneOf")
    if options is None:
        return {ref}
    return {option["$ref"].rsplit("/", 1)[1] if "$ref" in option else {"string": "str"}[option["type"]] for option in options}


def test_the_python_client_has_a_typed_function_per_operation(python_client: Generated, schema: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    assert python_client.returncode == 0, python_client.output
    monkeypatch.syspath_prepend(str(python_client.path.parent))

    for path, method, operation in operations(schema):
        name = f"{PACKAGE}.api.{operation['tags'][0]}.{operation['operationId']}"
        module = importlib.import_module(name)  # a module per operation, named by its operationId
        sync = inspect.signature(module.sync_detailed)
        if "requestBody" in operation:
            body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            assert sync.parameters["body"].annotation.__name__ == body, (name, sync)
        else:
            assert "body" not in sync.parameters, (name, sync)
        for parameter in operation.get("parameters", []):
            if parameter["in"] in ("path", "query"):
                assert parameter["name"] in sync.parameters, (name, parameter["name"], sync)
        returned = str(inspect.signature(module.sync).return_annotation)
        for status, response in operation["responses"].items():
            # One answer type per status: the first media type (POST /v1/messages answers JSON
            # unless the body asks for `stream: true`, whose events this client does not read).
            media = next(iter(response["content"].values()))
            for type_name in _python_types(schema, media):
                assert re.search(rf"\b{type_name}\b", returned), (name, status, type_name, returned)


# --- TypeScript: openapi-typescript and openapi-fetch ----------------------------------------


def test_openapi_typescript_reads_the_schema_without_a_warning(typescript_types: Generated) -> None:
    print(f"openapi-typescript: {typescript_types.seconds:.1f} s")

    assert typescript_types.returncode == 0, typescript_types.output
    # It prints its banner and the file it wrote; a warning or an error is a line starting ⚠ or ✘.
    assert not re.search(r"⚠|✘|warn|error", typescript_types.output, re.IGNORECASE), typescript_types.output


def _block(text: str, opening: str) -> str:
    """The text of a `name: {` ... `}` block of the generated file, by its indentation."""
    start = text.index(opening)
    indent = len(opening) - len(opening.lstrip(" "))
    end = text.index("\n" + " " * indent + "}", start)
    return text[start:end]


def test_the_typescript_types_have_every_operation_with_its_body(typescript_types: Generated, schema: dict[str, Any]) -> None:
    assert typescript_types.returncode == 0, typescript_types.output
    types = typescript_types.path.read_text()
    paths = _block(types, "export interface paths {")
    ops = _block(types, "export interface operations {")

    for path, method, operation in operations(schema):
        operation_id = operation["operationId"]
        assert f'{method}: operations["{operation_id}"];' in _block(paths, f'    "{path}": {{'), (path, method)
        declared = _block(ops, f"    {operation_id}: {{")
        if "requestBody" in operation:
            body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            assert f'"application/json": components["schemas"]["{body}"];' in declared, operation_id
        for status, response in operation["responses"].items():
            for media_type, media in response["content"].items():
                component = media["schema"]["$ref"].rsplit("/", 1)[1]
                assert f'"{media_type}": components["schemas"]["{component}"];' in declared, (operation_id, status)


def test_a_typescript_client_on_openapi_fetch_compiles_under_strict(typescript_types: Generated, npm_bin: Path) -> None:
    assert typescript_types.returncode == 0, typescript_types.output
    workdir = typescript_types.path.parent
    shutil.copy(TS_CLIENT, workdir / "client.ts")
    (workdir / "node_modules").symlink_to(NPM_DIR / "node_modules")
    command = [
        str(npm_bin / "tsc"), "--noEmit", "--strict", "--target", "es2022", "--module", "esnext",
        "--moduleResolution", "bundler", "--lib", "es2022,dom", "client.ts",
    ]

    result, seconds = _run(command, cwd=workdir)

    print(f"tsc: {seconds:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr


# --- The Python client against a live service -------------------------------------------------


@pytest.mark.e2e
def test_the_generated_python_client_drives_a_live_service(
    python_client: Generated, schema: dict[str, Any], start_server: Callable[..., Server], start_cluster: Callable[..., Cluster]
) -> None:
    assert python_client.returncode == 0, python_client.output
    server = start_server()
    start_cluster()
    key = APIKey.objects.create_key(name="client-demo", owner="client-demo")[1]
    # The client was generated from the schema this server serves.
    assert httpx.get(f"{server.url}/v1/schema", headers={"Accept": "application/vnd.oai.openapi+json"}).json() == schema

    command = [sys.executable, str(ROOT / "scripts" / "client_demo.py"), "--base-url", server.url, "--key", key, "--client-dir", str(python_client.path)]
    result, seconds = _run(command, cwd=ROOT, timeout=120)

    print(result.stdout, f"client_demo.py: {seconds:.1f} s", sep="")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("every step answered as the contract says"), result.stdout
    assert "Traceback" not in server.log(), server.log()
