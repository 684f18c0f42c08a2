"""The documentation stands alone: README.md, docs/*.md and bench/README.md link to nothing
outside the repository. A clone has no `../shared/…`, so a link there is a dead link for
every user; a relative link must name a file the repository has; a web link may only point
at the service itself (localhost, 127.0.0.1) or at example.com, which the examples use.

Only what renders as a link is checked: `[text](target)`, `![alt](target)`, reference
definitions `[label]: target`, and `<scheme:…>` autolinks, outside code fences and inline
code. Code may mention any URL (a provider's `base_url` default, say)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_HOSTS = {"localhost", "127.0.0.1", "example.com"}

# CommonMark fences: three or more backticks or tildes; the closing one uses the same
# character, at least as many, and has no info string. (List items indent their fences.)
FENCE = re.compile(r"^(`{3,}|~{3,})(.*)$")
INLINE_CODE = re.compile(r"(`+)(?:.+?)\1", re.DOTALL)
# [text](target "title") and ![alt](target); the text may hold one level of brackets.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
AUTOLINK = re.compile(r"<([A-Za-z][A-Za-z0-9+.-]{1,31}:[^<>\s]*)>")


def documentation_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def prose(text: str) -> str:
    """`text` without its fenced code blocks and inline code spans."""
    kept: list[str] = []
    opened: tuple[str, int] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        fence = FENCE.match(stripped)
        if opened is None:
            if fence and not (fence.group(1)[0] == "`" and "`" in fence.group(2)):
                opened = (fence.group(1)[0], len(fence.group(1)))
            else:
                kept.append(line)
        elif fence and fence.group(1)[0] == opened[0] and len(fence.group(1)) >= opened[1] and not fence.group(2).strip():
            opened = None
    assert opened is None, "a code fence is never closed"
    return INLINE_CODE.sub("", "\n".join(kept))


def link_targets(text: str) -> list[str]:
    body = prose(text)
    targets = [m.group(1) for m in INLINE_LINK.finditer(body)]
    targets += [m.group(1) for m in REFERENCE_DEFINITION.finditer(body)]
    targets += [m.group(1) for m in AUTOLINK.finditer(body)]
    return [target[1:-1] if target.startswith("<") and target.endswith(">") else target for target in targets]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(line.lstrip("#")) for line in prose(text).splitlines() if re.match(r"^#{1,6} ", line)}


def problem(source: Path, target: str) -> str | None:
    """Why `target`, linked from `source`, leaves the repository or leads nowhere; None if fine."""
    if target.startswith("#"):
        if unquote(target[1:]).lower() not in anchors(source.read_text()):
            return "names no heading of this file"
        return None
    parts = urlsplit(target)
    if parts.scheme in ("http", "https"):
        host = (parts.hostname or "").lower()
        if host in ALLOWED_HOSTS or host.endswith(".example.com"):
            return None
        return f"points at {host or 'no host'}, outside the repository"
    if parts.scheme or parts.netloc:
        return "is not a link into the repository"
    if parts.path.startswith("/"):
        return "is an absolute path; link relative to the file"
    path = (source.parent / unquote(parts.path)).resolve() if parts.path else source
    if not path.is_relative_to(ROOT):
        return "leaves the repository"
    if not path.exists():
        return "names a file the repository does not have"
    return None


@pytest.mark.parametrize("path", documentation_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(path: Path) -> None:
    assert path.exists()
    found = [(target, problem(path, target)) for target in link_targets(path.read_text())]

    assert [f"{target}: {why}" for target, why in found if why] == []


def test_the_readme_points_to_the_api_reference() -> None:
    readme = (ROOT / "README.md").read_text()

    assert "docs/API.md" in link_targets(readme)
    assert (ROOT / "docs" / "API.md").exists()
    assert "../shared" not in readme


# The checker itself: it must catch what it is for, and leave code alone.


def test_the_checker_refuses_links_that_leave_the_repository() -> None:
    source = ROOT / "README.md"
    text = "\n".join(
        [
            "See [`../shared/design/API.md`](../shared/design/API.md) and ![x](missing.png).",
            "[ref]: https://github.com/someone/repo",
            "Or <https://docs.python.org/3/>, [site](//cdn.example.net/x), [abs](/etc/passwd).",
        ]
    )
    targets = link_targets(text)

    assert targets == ["../shared/design/API.md", "missing.png", "//cdn.example.net/x", "/etc/passwd",
                       "https://github.com/someone/repo", "https://docs.python.org/3/"]
    assert all(problem(source, target) for target in targets)


def test_the_checker_accepts_local_links_and_skips_code() -> None:
    source = ROOT / "README.md"
    text = "\n".join(
        [
            "Read [the reference](docs/API.md#endpoints), [bench](bench/README.md), <http://127.0.0.1:8000/v1/docs>,",
            "[an example](https://api.example.com/v1) and `[code](../outside.md)`.",
            "```toml",
            'base_url = "https://api.openai.com/v1"   # [not a link](../shared/x.md) <https://api.anthropic.com>',
            "```",
            "  ```sh",
            "  curl https://api.anthropic.com  [no](../no.md)",
            "  ```",
        ]
    )
    targets = link_targets(text)

    assert targets == ["docs/API.md#endpoints", "bench/README.md", "https://api.example.com/v1", "http://127.0.0.1:8000/v1/docs"]
    assert [problem(source, target) for target in targets] == [None] * 4
