"""Docs that stay true: every Python or shell snippet of README.md and docs/ is run by a test or says why not, and
the README and the reference pages name no commit or issue (figures in docs/experiments/ and docs/BENCHMARKS.md
may name the commit they were measured on).

A fenced block's mark is the line just above it: `<!-- run: tests/FILE.py::TEST -->` (that test runs it) or
`<!-- not run: REASON -->` (a GPU, a download, hours). This file runs the Python and YAML blocks marked with its
own tests."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from train_helpers import ROOT

from distill.recipe import parse_recipe

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SNIPPET_LANGUAGES = {"python", "sh", "bash", "shell", "console"}
FENCE = re.compile(r"^```(\S*)\n(.*?)^```\s*$", re.S | re.M)
MARK = re.compile(r"<!-- (?:run: (tests/[\w/]+\.py)::(\w+)|not run: (\S.*?)) -->\n\Z")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    code: str
    mark: re.Match | None  # the mark on the line above, if any

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(pages: list[Path] = PAGES) -> list[Block]:
    found = []
    for page in pages:
        text = page.read_text()
        for match in FENCE.finditer(text):
            before = text[: match.start()]
            above = before[before.rstrip("\n").rfind("\n") + 1 :]
            mark = MARK.search(above)
            found.append(Block(page, before.count("\n") + 1, match.group(1), match.group(2), mark))
    return found


def marked_for(test: str, language: str) -> list[Block]:
    return [b for b in blocks() if b.language == language and b.mark and b.mark.group(2) == test]


def defined_tests(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


def test_every_python_or_shell_snippet_is_run_by_a_test_or_says_why_not():
    found = blocks()
    assert len(found) > 10, "no fenced blocks found: has the docs' form changed?"
    unlabelled = [str(b) for b in found if not b.language]
    assert not unlabelled, f"fenced blocks without a language (python, sh, text, yaml...): {unlabelled}"
    problems = []
    for block in (b for b in found if b.language in SNIPPET_LANGUAGES):
        if block.mark is None:
            problems.append(f"{block}: no `<!-- run: tests/FILE.py::TEST -->` or `<!-- not run: REASON -->` above")
        elif block.mark.group(1):
            path, test = ROOT / block.mark.group(1), block.mark.group(2)
            if not path.exists() or test not in defined_tests(path):
                problems.append(f"{block}: {block.mark.group(1)}::{test} does not exist")
    assert not problems, "\n".join(problems)


def test_the_mark_check_sees_an_unmarked_snippet(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```sh\nls\n```\n\n<!-- not run: needs ImageNet -->\n```sh\nls /imagenet\n```\n")
    first, second = blocks([page])
    assert first.mark is None and second.mark.group(3) == "needs ImageNet"


PYTHON = marked_for("test_python_snippets_in_the_docs_run", "python")
YAML = marked_for("test_yaml_recipes_in_the_docs_are_valid", "yaml")


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_snippets_in_the_docs_run(block, tmp_path):
    """Each in a fresh directory, as pasted."""
    proc = subprocess.run([sys.executable, "-c", block.code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("block", YAML, ids=str)
def test_yaml_recipes_in_the_docs_are_valid(block):
    parse_recipe(yaml.safe_load(block.code))


def test_the_docs_have_snippets_run_here():
    assert PYTHON and YAML


# ---- no commit hashes or issue numbers -------------------------------------------------------------------

# What a git commit looks like in prose: 7 to 40 hex digits, at least one digit and one letter, standing alone
# (not inside a longer hex string such as a sha256, a path or an identifier).
COMMIT = re.compile(r"(?<![\w/.:@-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w-])")
ISSUE = re.compile(r"\b(?:issue|pull request|PR)\s+#?\d+\b|(?<![\w&/])#\d+\b", re.I)
# Commits of other projects that a page cites as its source: microsoft/Cream, the methods' reference code.
ALLOWED = {"4a13c40"}
# Pages that may name the commit a figure was measured on.
MEASURED = [ROOT / "docs" / "experiments", ROOT / "docs" / "BENCHMARKS.md"]


def history(text: str) -> list[str]:
    """Commit hashes and issue numbers in `text`'s prose (fenced code left out)."""
    prose = FENCE.sub("", text)
    return [m.group(0) for m in COMMIT.finditer(prose) if m.group(0) not in ALLOWED] + [
        m.group(0) for m in ISSUE.finditer(prose)
    ]


@pytest.mark.parametrize(
    "text, found",
    [
        ("as measured at d4e3fc6, and since e5c0e20", ["d4e3fc6", "e5c0e20"]),
        ("fixed in issue 12; see #14 and PR 3", ["issue 12", "#14", "PR 3"]),
        ("a sha256 of 0f3c2a9b8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a3928170f6e5d4c3b", []),
        ("1000000 images, a decade of 2026-12-02, deadbeef, bicubic, [a](#the-store-2), &#8212;", []),
        ("```sh\ngit checkout d4e3fc6\n```\n", []),
    ],
)
def test_the_history_check_finds_commits_and_issues_only(text, found):
    assert history(text) == found


def test_no_commit_hash_or_issue_number_in_the_readme_or_the_reference_pages():
    reference = [p for p in PAGES if not any(p == m or m in p.parents for m in MEASURED)]
    assert ROOT / "README.md" in reference and ROOT / "docs" / "cli.md" in reference
    named = {str(p.relative_to(ROOT)): history(p.read_text()) for p in reference}
    assert not {page: found for page, found in named.items() if found}
