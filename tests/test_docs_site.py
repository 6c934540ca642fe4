"""The docs build as a static site (MkDocs + Material, mkdocs.yml) in strict mode: a broken link or anchor, a page
missing from the nav or a nav entry without its page fails the build. (Not `--quiet`: it hides the warnings that
strict mode counts.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from train_helpers import ROOT

MKDOCS = [sys.executable, "-m", "mkdocs", "build", "--strict"]
ENV = {"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1"}


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*MKDOCS, "-f", str(root / "mkdocs.yml"), "-d", str(site)], cwd=root, capture_output=True,
                          text=True, env=ENV)  # fmt: skip


def test_the_docs_site_builds_strict(tmp_path):
    proc = build(ROOT, tmp_path / "site")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "cli" / "index.html").exists() and (tmp_path / "site" / "data_path.png").exists()


def test_a_broken_link_or_a_page_left_out_of_the_nav_fails_the_build(tmp_path):
    for damage, expected in [
        (lambda docs: (docs / "orphan.md").write_text("# A page no nav names\n"), "orphan.md"),
        (lambda docs: (docs / "index.md").open("a").write("\n[x](cli.md#no-such-anchor)\n"), "no-such-anchor"),
        (lambda docs: (docs / "index.md").open("a").write("\n[x](../tools/demo.py)\n"), "../tools/demo.py"),
    ]:
        copy = tmp_path / expected.replace("/", "_")
        shutil.copytree(ROOT / "docs", copy / "docs")
        shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        damage(copy / "docs")
        proc = build(copy, copy / "site")
        assert proc.returncode != 0 and expected in proc.stdout + proc.stderr, proc.stdout + proc.stderr
