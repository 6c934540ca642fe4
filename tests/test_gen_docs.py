"""docs/cli.md and docs/recipes.md say what the parsers and the recipe schema say: their generated parts equal a
fresh generation (`tools/gen_docs.py --check`), and, read independently, name every option and every key with its
default."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import typing

import pytest
from train_helpers import ROOT

from distill import cli
from distill.recipe import METHODS, Recipe
from logit_store.cli import build_parser

CLI_PAGE = (ROOT / "docs" / "cli.md").read_text()
RECIPE_PAGE = (ROOT / "docs" / "recipes.md").read_text()


def gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "tools" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_references_are_up_to_date():
    """Fails when a parser or the schema changed and the pages were not regenerated; says how to regenerate."""
    proc = subprocess.run([sys.executable, "tools/gen_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_check_fails_on_a_new_option_and_names_the_command(monkeypatch, capsys):
    module = gen_docs()
    parser = cli.train_parser()
    parser.add_argument("--brand-new", help="an option the page does not know")
    monkeypatch.setitem(module.CLIS, "distill-train", lambda: parser)
    assert module.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/cli.md" in err and "python3 -m uv run --frozen python tools/gen_docs.py" in err


def test_the_generator_imports_no_torch():
    probe = "import runpy, sys; runpy.run_path('tools/gen_docs.py', run_name='x'); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.split() == ["False"], proc.stderr[-2000:]


def parsers() -> dict[str, argparse.ArgumentParser]:
    found = {"distill-save-logits": cli.save_parser(), "distill-train": cli.train_parser(),
             "distill-eval": cli.eval_parser(), "distill-store": build_parser()}  # fmt: skip
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            found |= {f"distill-store {name}": sub for name, sub in action.choices.items()}
    return found


@pytest.mark.parametrize("prog", list(parsers()))
def test_the_cli_page_has_every_option_with_its_help(prog):
    parser = parsers()[prog]
    section = CLI_PAGE[CLI_PAGE.index(f"usage: {prog} ") :]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        row = next(line for line in section.splitlines() if line.startswith("| `"))  # its table's rows follow
        rows = section[section.index(row) :].split("\n\n")[0]
        name = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
        [line] = [r for r in rows.splitlines() if re.match(rf"\| `{re.escape(name)}[ `]", r)]
        assert " ".join((action.help or "").split()).replace("|", "\\|") in line, (prog, name)


def keys(cls: type, prefix: str = "") -> dict[str, object]:
    """Every key path of a schema dataclass and its default (required: MISSING), written out here."""
    found = {}
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        nested = [a for a in (typing.get_args(kind) or (kind,)) if dataclasses.is_dataclass(a)]
        if f.default is not dataclasses.MISSING:
            found[prefix + f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING and not nested:
            found[prefix + f.name] = f.default_factory()
        elif f.default_factory is dataclasses.MISSING:
            found[prefix + f.name] = dataclasses.MISSING
        for section in nested:
            found |= keys(section, prefix + f.name + ".")
    return found


def page_rows(text: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"\| `([\w.]+)` \| (.*)", line)
        if match:
            rows.setdefault(match.group(1), []).append(line)
    return rows


def test_the_recipe_page_has_every_key_with_its_default_and_a_meaning():
    schemas = [("", Recipe, RECIPE_PAGE[RECIPE_PAGE.index("## Every key") : RECIPE_PAGE.index("## The `loss`")])]
    for name in METHODS.names():
        section = RECIPE_PAGE[RECIPE_PAGE.index(f"### `method: {name}`") :]
        end = section.find("\n### ")  # the next method's section, if any
        schemas.append(("loss.", METHODS.get(name).loss, section if end < 0 else section[:end]))
    for prefix, cls, text in schemas:
        rows = page_rows(text)
        for path, default in keys(cls, prefix).items():
            assert path in rows, (cls.__name__, path)
            cells = [c.strip() for c in rows[path][0].strip("|").split(" | ")]
            shown = "required" if default is dataclasses.MISSING else f"`{json.dumps(default)}`"
            assert cells[2] == shown, (path, cells[2], shown)
            assert cells[3], f"{path}: no meaning (a comment on its field in the source)"
