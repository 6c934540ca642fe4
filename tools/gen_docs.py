"""Generate the reference parts of docs/cli.md and docs/recipes.md from the code, so that they cannot drift.

    python3 -m uv run --frozen python tools/gen_docs.py           # rewrite the generated parts
    python3 -m uv run --frozen python tools/gen_docs.py --check   # exit 1 naming each page that differs

A page holds hand-written prose and generated blocks, each between `<!-- generated: KEY -->` and
`<!-- end generated: KEY -->`; only the blocks are rewritten. The CLI blocks come from the argparse parsers
(`distill.cli.train_parser`, `save_parser`, `eval_parser`, `logit_store.cli.build_parser`, subcommands
included), the recipe blocks from the recipe schema: the dataclasses of `distill.recipe.Recipe`, walked
field by field, and each installed method's `loss` dataclass (`distill.recipe.METHODS`). A key's help is
its field's comment in the source (on its line, or the comment lines just above it). Nothing here imports
torch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import os
import re
import sys
import textwrap
import tokenize
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill import cli  # noqa: E402
from distill.recipe import METHODS, Recipe  # noqa: E402
from distill.schema import _describe  # noqa: E402
from logit_store.cli import build_parser  # noqa: E402

PAGES = ("docs/cli.md", "docs/recipes.md")
REGENERATE = "python3 -m uv run --frozen python tools/gen_docs.py"
BLOCK = re.compile(r"(<!-- generated: (?P<key>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- end generated: (?P=key) -->)", re.S)


# ---- the command lines ---------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    """Text fit for one cell of a Markdown table."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _usage(parser: argparse.ArgumentParser) -> str:
    """The parser's usage line at a fixed width (argparse reads the terminal's otherwise)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return parser.format_usage().strip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    takes = "" if action.nargs == 0 else " " + (action.metavar or action.dest.upper())
    if action.choices:
        takes = " {" + ",".join(map(str, action.choices)) + "}"
    return ", ".join(f"`{flag}{takes}`" for flag in action.option_strings)


def _default(action: argparse.Action) -> str:
    if (action.option_strings and action.nargs == 0) or action.default in (None, argparse.SUPPRESS, []):
        return ""
    return f"`{action.default}`"


def render_parser(parser: argparse.ArgumentParser) -> str:
    """Usage, then a table of every argument: its form, its default and its help (subcommands each in turn)."""
    lines = ["```text", _usage(parser), "```", ""]
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    rows = [a for a in parser._actions if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)]
    if rows:
        lines += ["| argument | default | meaning |", "|---|---|---|"]
        lines += [f"| {_argument(a)} | {_default(a)} | {_cell(a.help or '')} |" for a in rows]
        lines.append("")
    for group in subcommands:
        helps = {a.dest: a.help for a in group._choices_actions}
        for name, sub in group.choices.items():
            lines += [f"### `{parser.prog} {name}`", "", _cell(helps.get(name) or ""), "", render_parser(sub)]
    return "\n".join(lines).rstrip() + "\n"


CLIS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "distill-save-logits": cli.save_parser,
    "distill-train": cli.train_parser,
    "distill-eval": cli.eval_parser,
    "distill-store": build_parser,
}


# ---- the recipe schema ---------------------------------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """Each dataclass field's comment in `cls`'s source: on its lines, after the comment lines above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(token.start[0])
    found = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and line not in code_lines:
            above.insert(0, comments[line])
            line -= 1
        inline = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        found[node.target.id] = " ".join(above + inline)
    return found


def _shown(value: Any) -> str:
    return f"`{json.dumps(value)}`"


def _sections(kind: Any) -> list[type]:
    """The dataclasses a field's type holds (a section, or a section or null)."""
    return [a for a in (typing.get_args(kind) or (kind,)) if dataclasses.is_dataclass(a)]


def _class_doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())  # not dataclass's own signature


def schema_rows(cls: type, prefix: str = "") -> list[str]:
    """One table row per key of dataclass `cls`, nested sections flattened to dotted paths."""
    hints, helps, rows = typing.get_type_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        sections = _sections(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = _shown(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # a section's defaults are its keys'
            default = "" if sections else _shown(f.default_factory())
        else:
            default = "required"
        kind = "a section" + (" or null" if type(None) in typing.get_args(hints[f.name]) else "") if sections else None
        help_text = " ".join(filter(None, [helps.get(f.name, ""), *map(_class_doc, sections)]))
        rows.append(f"| `{path}` | {_cell(kind or _describe(hints[f.name]))} | {default} | {_cell(help_text)} |")
        for section in sections:
            rows += schema_rows(section, path + ".")
    return rows


def render_schema(cls: type, prefix: str = "") -> str:
    header = ["| key | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(header + schema_rows(cls, prefix)) + "\n"


def render_methods() -> str:
    """Each installed method: what teacher it takes and its `loss` section's keys."""
    parts = []
    for name in METHODS.names():
        spec = METHODS.get(name)
        module = sys.modules[spec.loss.__module__]
        summary = " ".join((module.__doc__ or "").split("\n\n")[0].split())
        parts += [f"### `method: {name}`", "", summary, ""]
        parts += [f"Teacher: {spec.teacher}; the teacher gives {spec.outputs}. Its `loss` section:", ""]
        keys = dataclasses.fields(spec.loss)
        parts.append(render_schema(spec.loss, "loss.") if keys else "No keys.\n")
    return "\n".join(parts)


def generated(key: str) -> str:
    """The text of generated block `key`."""
    if key.startswith("cli:"):
        return render_parser(CLIS[key.removeprefix("cli:")]())
    if key == "recipe":
        return render_schema(Recipe)
    if key == "methods":
        return render_methods()
    raise KeyError(f"unknown generated block {key!r} (known: {['cli:' + c for c in CLIS] + ['recipe', 'methods']})")


def regenerate(text: str) -> str:
    """`text` with every generated block replaced by what the code says now."""
    return BLOCK.sub(lambda m: m.group(1) + generated(m.group("key")) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        path = ROOT / page
        old = path.read_text()
        new = regenerate(old)
        if new != old:
            stale.append(page)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; regenerate with `{REGENERATE}`", file=sys.stderr)
        return 1
    print("\n".join(f"regenerated {page}" for page in stale) or "up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
