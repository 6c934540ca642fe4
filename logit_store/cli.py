"""`distill-store info|verify|repair|convert|card|views`: inspect, check, repair, move and describe logit (and
embeddings) stores."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from .api import convert_store, open_store
from .backends import BACKENDS
from .errors import DistillError, StoreInputError
from .location import StoreLocation
from .manifest import plane_name
from .registry import Registry
from .store import LogitStore

# Subcommands of other installed packages: each entry point adds its parser to the subparsers (`views` is the
# engine's, `distill.view_params:add_command`: it replays views, which this package does not import).
COMMANDS = Registry("distill-store command", StoreInputError, group="logit_store.commands")


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _coverage_lines(records: dict[int, int], num_samples: int) -> list[str]:
    """One line per epoch (runs of complete or missing epochs on one line): "epoch 3: 1,200 of 1,797 records"."""
    lines: list[str] = []
    runs: list[tuple[int, int, int]] = []  # (first, last, records) of consecutive epochs alike
    for epoch, n in sorted(records.items()):
        whole = n in (0, num_samples)
        if runs and whole and runs[-1][2] == n and runs[-1][1] == epoch - 1:
            runs[-1] = (runs[-1][0], epoch, n)
        else:
            runs.append((epoch, epoch, n))
    for first, last, n in runs:
        where = f"epoch {first}" if first == last else f"epochs {first}-{last}"
        state = "complete" if n == num_samples else "missing" if n == 0 else f"{n:,} of {num_samples:,} records"
        lines.append(f"{where}: {state}")
    return lines


def _plane_ranges(planes: list[int]) -> str:
    """ "epochs 0-2, 5": a sorted list of planes as ranges."""
    runs: list[list[int]] = []
    for p in sorted(planes):
        if runs and runs[-1][1] == p - 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"epoch {text}" if len(planes) == 1 else f"epochs {text}"


def cmd_info(args: argparse.Namespace) -> int:
    with open_store(args.store, read_only=True) as store:
        info = store.info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    m = info["manifest"]
    print(f"store        {info['location']}")
    print(f"format       v{m['format_version']}, {m['backend']}, shards of {m['shard_records']} records")
    if m["kind"] == "embeddings":
        print(f"kind         embeddings, embed_dim={m['embed_dim']} (image embedding per epoch and id, text per id)")
        print(
            f"records      {info['records']} ({m['num_samples']} samples x ({m['epochs']} planned epochs + text plane))"
        )
    else:
        print(
            f"records      {info['records']} ({m['num_samples']} samples x {m['epochs']} planned epochs), k={m['k']} of {m['num_classes']} classes"
        )
    print(f"epochs done  {info['completed_epochs']}")
    for line in _coverage_lines({int(e): n for e, n in info["records_per_epoch"].items()}, m["num_samples"]):
        print(f"  {line}")
    if "text_complete" in info:
        print(f"text plane   {'complete' if info['text_complete'] else 'incomplete'}, {info['text_records']} records")
    print(f"on disk      {info['bytes_on_disk']} bytes, {_fmt(info['bytes_per_record'])} bytes/record")
    print(f"teacher      {m['teacher']}")
    print(f"dataset      {m['dataset']}")
    print(f"augmentation hash {m['augmentation'].get('hash')}, global seed {m['global_seed']}, mixing {m['mixing']}")
    for entry in m.get("provenance", []):
        source = ", ".join(f"{key} {entry[key]}" for key in sorted(entry) if key not in ("by", "planes"))
        print(f"written by   {entry.get('by', '?')}: {_plane_ranges(entry['planes'])} ({source})")
    for key, value in info["statistics"].items():
        if value is None and m["kind"] == "embeddings":  # no top-k statistics
            continue
        print(f"  {key:26s} {_fmt(value)}")
    for plane, digest in info["content_hashes"].items():
        print(f"  {'text plane' if plane == 'text' else f'epoch {plane:>4}'} sha256 {digest}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with open_store(args.store, read_only=True) as store:
        problems = store.verify()
    for problem in problems:
        print(f"{store.location}: {problem}")
    m = store.manifest
    if problems:
        ranges = [p for p in problems if p.kind != "shared"]
        found = [f"{len(ranges)} damaged or missing range(s)"] if ranges else []
        if len(ranges) < len(problems):
            found.insert(0, "a damaged file every record range depends on")
        print(f"FAILED: {' and '.join(found)}")
        _advise(store, {p.kind for p in problems})
        return 1
    planes = f"{m.planes} planes ({m.epochs} epochs + text plane)" if m.planes > m.epochs else f"{m.epochs} epochs"
    print(f"OK: {planes} x {m.num_samples} records intact")
    return 0


def _advise(store: LogitStore, kinds: set[str]) -> None:
    """What to do about the problems verify found. Repair is advised only where it mends: a file every range
    depends on, or a manifest that does not fit intact records, is not a shard's damage."""
    if "shared" in kinds:
        print(
            "a file every record range depends on is damaged (named above): distill-store repair cannot mend it; "
            f"restore that file from a copy (the commits then stand), or delete {store.location} and save again"
        )
    elif "damaged" in kinds:
        print(f"to rewrite the damaged shards: distill-store repair {store.location}, then run the save again")
    if "invalid" in kinds:
        print(f"intact records do not fit {store.location}/manifest.json (was it edited?): restore the manifest")


def cmd_repair(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    dropped = store.repair()
    for plane, shard in dropped:
        start, stop = store.manifest.shard_range(shard)
        print(f"{store.location}: {plane_name(store.manifest, plane)} records [{start}, {stop}): commit marker dropped")
    if not dropped:
        print(f"nothing to repair: every committed shard of {store.location} is intact")
        return 0
    print(f"repaired: {len(dropped)} damaged shard(s) uncommitted; run the save again to rewrite them")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    src = open_store(args.src, read_only=True)
    local = StoreLocation(args.dst).is_local  # lmdb stores are local only
    other = "lmdb" if src.manifest.backend == "zarr" and local else "zarr"
    backend = args.backend or (src.manifest.backend if args.upgrade else other)
    dst = convert_store(src, args.dst, backend, upgrade=args.upgrade)
    versions = f"v{src.manifest.format_version} -> v{dst.manifest.format_version}"
    print(f"converted {src.location} ({src.manifest.backend}) -> {dst.location} ({backend}), {versions}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from .card import dataset_card

    with open_store(args.store, read_only=True) as store:
        card = dataset_card(store)
    if args.output is None:
        print(card, end="")
        return 0
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write(card)
    print(f"wrote the dataset card of {store.location} to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill-store", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="manifest, progress, size, statistics and content hashes")
    info.add_argument("store")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)
    verify = sub.add_parser("verify", help="check every record; exit 1 naming damaged or missing ranges")
    verify.add_argument("store")
    verify.set_defaults(func=cmd_verify)
    repair = sub.add_parser(
        "repair", help="uncommit the damaged shards (drop their commit markers) so that a re-run save rewrites them"
    )
    repair.add_argument("store")
    repair.set_defaults(func=cmd_repair)
    convert = sub.add_parser("convert", help="copy a store into another backend, record for record")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument(
        "--backend",
        choices=BACKENDS.names(),
        help="target backend (default: the other one, zarr for a URL; with --upgrade the same)",
    )
    convert.add_argument(
        "--upgrade",
        action="store_true",
        help="write the current format version (re-encodes a version-1/2 logits store so it can be resumed)",
    )
    convert.set_defaults(func=cmd_convert)
    card = sub.add_parser("card", help="a dataset card: Markdown with YAML front matter (Hugging Face style)")
    card.add_argument("store")
    card.add_argument("-o", "--output", help="write the card to this file (default: print it)")
    card.set_defaults(func=cmd_card)
    for name in COMMANDS.names():
        COMMANDS.get(name)(sub)
    return parser


class _Stderr(logging.Handler):
    """The library's log messages (`logit_store.api`'s "replacing ...") as plain lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


_STDERR = _Stderr()


def log_to_stderr() -> None:
    """Print the library's log messages as plain lines on stderr (once, however often called): what a
    command-line tool does, the library itself only logs (`logging.getLogger("logit_store")`)."""
    library = logging.getLogger("logit_store")
    library.setLevel(logging.INFO)  # whatever level the root logger was given by anyone else
    if _STDERR not in library.handlers:
        library.addHandler(_STDERR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr()
    try:
        return args.func(args)
    except DistillError as err:
        print(f"distill-store {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `distill-store info STORE | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
