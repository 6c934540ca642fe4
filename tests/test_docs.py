"""The docs name tests that exist: every `tests/FILE.py::NAME` in README.md and docs/ is a test function or class there (or,
for a back-end's contract test, in the suite it inherits, `logit_store/testing.py`)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `tests/x.py::test_a` and, after it in the same cell, `::test_b` (the same file)
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?::(\w+)(?:::(\w+))?")


def defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}


def test_every_test_named_in_the_docs_exists():
    contract = defined_names(ROOT / "logit_store" / "testing.py")
    missing, found = [], 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        last = None
        for match in REFERENCE.finditer(doc.read_text()):
            found += 1
            file, first, second = match.groups()
            last = file or last
            assert last is not None, f"{doc}: '::{first}' with no test file before it"
            path = ROOT / last
            names = defined_names(path) if path.exists() else set()
            name = second or first
            if name not in names and not (second and name in contract):
                missing.append(f"{doc.relative_to(ROOT)}: {last}::{name}")
    assert found > 100, f"only {found} test references found: has the docs' form of them changed?"
    assert not missing, "docs name tests that do not exist:\n" + "\n".join(missing)
