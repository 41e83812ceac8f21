"""The README and docs/: every relative link and #anchor resolves, the front door stays small, the pages name what
params.yaml holds, and no project file points at design notes the project does not ship."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from layerprobe.params import load_params

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 10 * 1024  # bytes: a front door, the guides in docs/

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text without code blocks and code spans, where brackets are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens, repeats numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ... are not ours to check
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    return broken


def test_the_link_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## How sure is a gain?\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#how-sure-is-a-gain) [self](#a-title) ![img](gone.png) [bad](other.md#nowhere) "
        "`[not a link](nothing.md)` [web](https://example.com)\n\n# A title\n"
    )
    assert broken_links(page) == [
        f"gone.png (no file {tmp_path / 'gone.png'})",
        "other.md#nowhere (no heading #nowhere in other.md)",
    ]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_the_readme_is_a_front_door_that_indexes_every_docs_page():
    readme = ROOT / "README.md"
    assert readme.stat().st_size < README_LIMIT, f"README.md is {readme.stat().st_size} bytes"
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(prose(readme.read_text()))}
    assert {page for page in PAGES[1:] if page not in linked} == set()


def test_the_readme_test_command_is_the_one_ci_runs():
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    readme_lines = {line for block in FENCE.findall((ROOT / "README.md").read_text()) for line in block.splitlines()}
    assert ci_command in readme_lines


def test_the_results_page_names_every_task_of_params_and_which_ones_the_suite_leaves_out():
    params = load_params(ROOT / "params.yaml")
    section = (ROOT / "docs/results.md").read_text().split("## What the default run computes")[1].split("\n## ")[0]
    rows = {line.split("|")[1].strip(" `"): line for line in section.splitlines() if line.startswith("| `")}
    assert set(rows) == set(params.datasets)
    assert {name for name, row in rows.items() if "left out of the suite" in row} == set(params.datasets) - set(
        params.suite.datasets
    )
    assert len(params.suite.backbones) == 1 and len(params.train.seeds) == 1
    assert "one backbone and one seed" in section


def test_no_project_file_points_at_design_notes_outside_the_project():
    pointer = re.compile(r"\.\./" + "shared/|[^/]" + "DESIGN" + r"\.md")  # spelled apart: this file is searched too
    folders = ("src", "flows", "benchmarks", "tests", "docs")
    files = [ROOT / "README.md", *(path for folder in folders for path in (ROOT / folder).rglob("*"))]
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in files
        if path.is_file() and path.suffix in (".py", ".md", ".yaml", ".toml", ".txt")
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if pointer.search(line)
    ]
    assert found == []
