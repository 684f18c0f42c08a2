"""The README renders as written and says what the service does: its code fences close where
they should, its TOML example is a models file the service loads, and the cancel contract is
the same in the README and the OpenAPI schema."""

from __future__ import annotations

import re
from pathlib import Path

from rest_framework.test import APIClient

from messaging import catalog

README = Path(__file__).resolve().parent.parent / "README.md"
# CommonMark: a fence is three or more backticks after at most three spaces; a closing fence
# has no info string.
FENCE = re.compile(r"^ {0,3}(`{3,})(.*)$")


def blocks_and_prose() -> tuple[list[tuple[str, str]], list[str]]:
    """([(info string, code)], prose lines), following the fences as a renderer does."""
    blocks: list[tuple[str, str]] = []
    prose: list[str] = []
    opened: tuple[str, str, list[str]] | None = None
    for line in README.read_text().splitlines():
        fence = FENCE.match(line.lstrip() if opened is None else line.strip())
        if opened is None:
            if fence:
                opened = (fence.group(1), fence.group(2).strip(), [])
            else:
                prose.append(line)
        elif fence and fence.group(1).startswith(opened[0]) and not fence.group(2).strip():
            blocks.append((opened[1], "\n".join(opened[2])))
            opened = None
        else:
            opened[2].append(line)
    assert opened is None, f"a {opened[1] or 'plain'} code fence is never closed"
    return blocks, prose


def test_every_code_fence_is_closed() -> None:
    blocks, _ = blocks_and_prose()

    assert len(blocks) > 10


def test_the_only_top_level_heading_is_the_title() -> None:
    """A comment line that slipped out of a code block renders as a heading."""
    _, prose = blocks_and_prose()

    assert [line for line in prose if line.startswith("# ")] == ["# Messaging"]


def test_the_toml_example_is_a_models_file_the_service_loads(tmp_path: Path) -> None:
    blocks, _ = blocks_and_prose()
    (toml,) = [code for info, code in blocks if info == "toml"]
    path = tmp_path / "models.toml"
    path.write_text(toml)

    models = {spec.id: spec for spec in catalog.load_models_file(path)}

    assert set(models) == {"llama-3.1-8b", "qwen2.5", "gpt-4o-mini", "claude-sonnet"}
    assert models["claude-sonnet"].provider == "anthropic"


def test_a_repeated_cancel_is_documented_as_200_everywhere(anonymous: APIClient) -> None:
    readme = " ".join(README.read_text().split())
    schema = anonymous.get("/v1/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    cancel = schema["paths"]["/v1/messages/{message_id}/cancel"]["post"]

    assert "Cancelling a cancelled message is 200 again" in readme
    assert "Cancelling a cancelled message is 200 again" in cancel["description"]
    assert "cancelling a cancelled message is 200" in cancel["responses"]["409"]["description"]
    assert "a finished one is 409" not in readme
