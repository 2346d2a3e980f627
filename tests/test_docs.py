"""The documentation holds together: links resolve, figures have their page, the design is the repository's own.

- Nothing cites a design file outside the repository: the design lives in docs/design.md.
- Every relative link in README.md and docs/*.md names a file that exists, and, where the link gives
  an anchor, a heading of that file (GitHub's anchor rules).
- docs/benchmarks.md, the one page for measured figures, exists with its side-by-side section.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs"
DESIGN_DOC = DOCS / "design.md"
BENCHMARKS_DOC = DOCS / "benchmarks.md"

# Spelled in two parts so that this file does not cite it itself.
OUTSIDE_DESIGN_FILE = "DESIGN" + ".md"

# Folders that are build output, caches or other people's code, relative to the repository root.
SKIPPED_DIRS = {
    ".git", ".venv", "venv", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis",
    ".ruff_cache", ".mypy_cache", "models", "runs", "reports", "logs", "bench/results",
}
LARGEST_TEXT_FILE = 2 * 1024 * 1024

MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _repository_text_files() -> list[Path]:
    """Every text file of the checkout, without build output, caches and virtual environments."""
    found = []
    for directory, subdirs, files in os.walk(REPO_ROOT):
        relative = Path(directory).relative_to(REPO_ROOT)
        subdirs[:] = [
            d for d in subdirs
            if d not in SKIPPED_DIRS and (relative / d).as_posix() not in SKIPPED_DIRS and not d.endswith(".egg-info")
        ]
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink() and path.stat().st_size <= LARGEST_TEXT_FILE:
                found.append(path)
    return found


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files (images, wheels) cite nothing


def _markdown_pages() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code removed."""
    lines, in_fence = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append((number, INLINE_CODE.sub("", line)))
    return lines


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    anchors = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            base = github_anchor(match.group(2))
            count = seen.get(base, 0)
            anchors.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return anchors


def test_github_anchor_follows_githubs_rules() -> None:
    assert github_anchor("Throughput (`bench.train_throughput`)") == "throughput-benchtrain_throughput"
    assert github_anchor("Side-by-side (make demo, bench.inprocess)") == "side-by-side-make-demo-benchinprocess"
    assert github_anchor("`--quick`") == "--quick"
    assert github_anchor("The REST server's inference-optimised copy") == "the-rest-servers-inference-optimised-copy"


def test_repeated_headings_get_numbered_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Tests\n\n```\n## not a heading\n```\n\n## Tests\n", encoding="utf-8")
    assert anchors_of(page) == {"title", "tests", "tests-1"}


def test_nothing_cites_a_design_file_outside_the_repository() -> None:
    citing = []
    for path in _repository_text_files():
        text = _read_text(path)
        if text is None or OUTSIDE_DESIGN_FILE not in text:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            title_of_design_doc = path == DESIGN_DOC and number == 1
            if OUTSIDE_DESIGN_FILE in line and not title_of_design_doc:
                citing.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not citing, (
        f"these lines cite {OUTSIDE_DESIGN_FILE}, which is not part of the repository; "
        "cite docs/design.md (the project's own design) or nothing:\n" + "\n".join(citing)
    )


@pytest.mark.parametrize("page", _markdown_pages(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_point_at_existing_files_and_headings(page: Path) -> None:
    broken = []
    for number, line in _prose_lines(page.read_text(encoding="utf-8")):
        for target in MARKDOWN_LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # http:, https:, mailto: ...: outside the repository
            path_part, _, anchor = target.partition("#")
            linked = (page.parent / unquote(path_part)).resolve() if path_part else page
            where = f"{page.relative_to(REPO_ROOT)}:{number}: ({target})"
            if not linked.exists():
                broken.append(f"{where}: no file {path_part}")
            elif anchor and linked.suffix == ".md" and linked.is_file() and anchor not in anchors_of(linked):
                broken.append(f"{where}: {linked.relative_to(REPO_ROOT)} has no heading with anchor #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_benchmarks_page_exists_with_its_side_by_side_section() -> None:
    assert BENCHMARKS_DOC.is_file(), "docs/benchmarks.md, the one page for measured figures, is missing"
    assert "side-by-side-comparison-make-demo-benchserving_alone-benchtorchserve_peer-benchinprocess" in anchors_of(
        BENCHMARKS_DOC
    ), "docs/benchmarks.md has no 'Side-by-side comparison (make demo, bench.serving_alone, ...)' section"


def test_design_page_exists() -> None:
    assert DESIGN_DOC.is_file(), "docs/design.md, the project's own description of its design, is missing"
