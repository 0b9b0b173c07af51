"""The documentation stays navigable: every relative link and #anchor in README.md and docs/*.md
resolves (GitHub's anchor slugs), and the README stays a short user's document."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200
_LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"[`*_]|<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file, repeated headings numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = "\n".join(_prose_lines(path.read_text(encoding="utf-8")))
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans hold no links
    return _LINK.findall(text)


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: {linked.relative_to(ROOT) if ROOT in linked.parents else linked} does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.name}")
    return broken


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path) == []


def test_readme_is_a_short_users_document():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
    head = "\n".join(lines[:10])
    assert "pneumoscan demo" in head and "pytest" in head  # the two commands come first


def test_every_docs_page_is_reachable_from_the_index():
    index = ROOT / "docs" / "index.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in links(index)}
    pages = set((ROOT / "docs").glob("*.md")) - {index}
    assert {p.name for p in pages if p.resolve() not in linked} == set()


def test_the_checker_finds_what_is_broken(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## What `x` does, in 2 steps!\n\n## Notes\n\n## Notes\n")
    page.write_text(
        "# Page\n\n[ok](other.md#what-x-does-in-2-steps) [ok](other.md#notes-1) [ok](#page) "
        "[web](https://example.org/x#y)\n[bad](missing.md) [bad anchor](other.md#nope) [bad](#nowhere)\n"
        "```\n[in code](ignored.md)\n```\n"
    )
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "other.md#nope", "#nowhere"]


def test_readme_results_row_is_the_bundled_models_recorded_test_read():
    """The README's row for the bundled model is what ``pneumoscan evaluate --record`` stored in it
    (AUC and accuracy with their intervals, sensitivity, specificity and loss, at the shipped threshold)."""
    from pneumoscan.model.store import load_bundle, resolve_model

    name = "default"
    test = load_bundle(resolve_model(name)).metrics["test"]
    lines = (ROOT / "README.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith(f"| **{name}**")).replace("**", "")  # bold is the best

    def cell(metric: str) -> str:
        low, high = test["ci95"][metric]
        return f"{test[metric]:.3f} ({low:.3f}–{high:.3f})"

    for metric in ("auc", "accuracy", "sensitivity", "specificity", "loss"):
        assert cell(metric) in row, f"README's {name} row lacks {metric} {cell(metric)}"
