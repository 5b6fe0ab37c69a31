"""The documentation's relative links resolve: every `[text](path)` and image in README.md, CHANGELOG.md and
docs/*.md names an existing file (and, with `#anchor`, an existing heading), and README.md links every doc."""

import re
import unicodedata
from pathlib import Path

from tests.paths import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
CHECKED = [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOCS]

# [text](target) or ![alt](target "title"); the text may hold one level of brackets.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def without_code(text: str) -> str:
    """Markdown text with fenced blocks and inline code blanked out (links there are not links)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub("", text)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings: lower case, punctuation dropped, spaces -> '-', repeats get -1, -2."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for match in HEADING.finditer(FENCE.sub("", text)):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))  # a linked heading keeps its text
        slug = "".join(
            ch for ch in title.strip().lower() if ch in " -_" or unicodedata.category(ch)[0] in "LN"
        ).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_targets(path: Path) -> list[str]:
    return LINK.findall(without_code(path.read_text(encoding="utf-8")))


def broken_links(path: Path) -> list[str]:
    """One message per relative link of `path` whose file or heading does not exist."""
    problems = []
    for target in link_targets(path):
        if SCHEME.match(target):  # http:, https:, mailto: ... are not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{path.name}: link {target!r}: {dest} does not exist")
        elif (
            anchor
            and dest.suffix == ".md"
            and anchor not in heading_anchors(dest.read_text(encoding="utf-8"))
        ):
            problems.append(f"{path.name}: link {target!r}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def test_every_relative_link_resolves():
    assert (ROOT / "CHANGELOG.md").exists() and DOCS
    problems = [problem for path in CHECKED for problem in broken_links(path)]
    assert not problems, "\n".join(problems)


def test_readme_links_every_doc():
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for target in link_targets(ROOT / "README.md")
        if not SCHEME.match(target)
    }
    missing = [doc.name for doc in DOCS if doc.resolve() not in linked]
    assert not missing, f"README.md does not link docs/{missing}"


def test_checker_finds_broken_files_and_anchors(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "other.md").write_text(
        "# Other page\n\n## Scoring sidecar: `POST /v1/score`\n", encoding="utf-8"
    )
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Second part\n\n"
        "[fine](other.md) ![fine](img.png) [fine](#second-part) [fine](other.md#scoring-sidecar-post-v1score)\n"
        "[web](https://example.com/missing.md) `[code](missing-in-code.md)`\n"
        "```\n[fenced](missing-in-fence.md)\n```\n"
        "[gone](missing.md) ![gone](docs/missing.png) [bad anchor](other.md#nowhere) [bad](#no-such-part)\n",
        encoding="utf-8",
    )
    problems = broken_links(page)
    assert len(problems) == 4, problems
    for target in ("missing.md", "docs/missing.png", "other.md#nowhere", "#no-such-part"):
        assert any(repr(target) in problem for problem in problems), (target, problems)
    assert not any("in-code" in problem or "in-fence" in problem for problem in problems)


def test_heading_anchors_follow_github():
    text = "# A B\n## Streaming, n, and what the confidence is about\n## A B\n```\n# not a heading\n```\n"
    assert heading_anchors(text) == {"a-b", "streaming-n-and-what-the-confidence-is-about", "a-b-1"}
