"""The documentation stands alone: every relative link resolves, the README stays short, and
nothing in the repository refers to documents outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 12_288
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, spaces
    to hyphens, repeats numbered -1, -2, ...)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, title in _HEADING.findall(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path: Path) -> list[str]:
    return _LINK.findall(_prose(path.read_text(encoding="utf-8")))


def test_docs_exist():
    for name in (
        "design",
        "method",
        "deployment",
        "privacy",
        "robustness",
        "benchmark",
        "forecasting",
        "configuration",
    ):
        assert (REPO / "docs" / f"{name}.md").is_file(), f"docs/{name}.md is missing"
    assert list((REPO / "docs" / "results").glob("*.md")), "docs/results/ holds no measurement"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
        elif not dest.resolve().is_relative_to(REPO):
            broken.append(f"{target}: points outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{doc.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def test_links_are_found():
    """The link scanner sees the README's links (a scanner that finds none proves nothing)."""
    targets = _links(REPO / "README.md")
    assert "docs/design.md" in targets and "docs/method.md" in targets


def test_readme_is_short():
    size = (REPO / "README.md").stat().st_size
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; keep it under {README_MAX_BYTES}"


# Names of documents that live outside the repository (built from parts so that this file
# does not match itself).
_OUTSIDE = ("../" + "shared", "DESIGN" + ".md", "paper" + " notes", "flower" + "-notes")
_TEXT_SUFFIXES = {
    ".py",
    ".md",
    ".yaml",
    ".yml",
    ".toml",
    ".txt",
    ".sh",
    ".cfg",
    ".ini",
    ".json",
    ".example",
}
_SKIP_DIRS = {
    ".git",
    ".venv",
    ".tmp",
    ".flwr",
    "outputs",
    "multirun",
    "__pycache__",
    ".pytest_cache",
    "build",
    "dist",
}


def _repo_text_files() -> list[Path]:
    files = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and (
            path.suffix in _TEXT_SUFFIXES or path.name in {"Makefile", "Dockerfile", "run"}
        ):
            files.append(path)
    return files


def test_nothing_refers_outside_the_repository():
    hits = []
    for path in _repo_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for name in _OUTSIDE:
            if name in text:
                hits.append(f"{path.relative_to(REPO)}: {name}")
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)
