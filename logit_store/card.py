"""A store's dataset card (`distill-store card`): Markdown with YAML front matter, as Hugging Face dataset cards
are written (`---`, the YAML, `---`, then Markdown).

The front matter holds what a reader checks a store against: the teacher and its weights' hash, the dataset's
fingerprint and size, the augmentation recipe and its hash, k, the epochs, the classes, the format version,
the statistics, the content hash of every complete plane (`distill-store info`'s) and the bytes on disk. Every
URL in it has its credentials removed (`location.redact_text`).
"""

from __future__ import annotations

from typing import Any

import yaml

from .location import redact_text
from .store import LogitStore

__all__ = ["card_fields", "dataset_card"]

HOW_TO_READ = """\
## How to read it

The records are top-k teacher logits (or embeddings), one per (epoch, sample id) view; the format is
specified in `docs/STORE_FORMAT.md` of the distill toolkit (records, packed rows, manifest, commit markers).
To train from it in your own loop, see the README section "Train from a store in your own loop"; to see
every view's augmentation written out (crop, flip, RandAugment operations, erasing, mixing), run
`distill-store views STORE --data DATASET --epoch E --ids A:B` (docs/STORE_FORMAT.md, "Views, explicitly").
Check a copy with `distill-store verify`, and its content against the `content_sha256` above with
`distill-store info --json`.
"""


def card_fields(store: LogitStore) -> dict[str, Any]:
    """The card's front matter as plain data (credentials redacted)."""
    info = store.info()
    m = info["manifest"]
    dataset = m["dataset"]
    fields = {
        "pretty_name": f"{m['kind']} of {m['teacher'].get('spec')} on {dataset.get('spec')}",
        "tags": ["knowledge-distillation", f"teacher-{m['kind']}"],
        "format_version": m["format_version"],
        "kind": m["kind"],
        "backend": m["backend"],
        "teacher": m["teacher"],
        "dataset": {key: dataset.get(key) for key in ("spec", "fingerprint", "fingerprint_mode", "num_samples")},
        "num_samples": m["num_samples"],
        "num_classes": m["num_classes"],
        "classes": dataset.get("classes"),
        "k": m["k"],
        "epochs": m["epochs"],
        "completed_epochs": info["completed_epochs"],
        "global_seed": m["global_seed"],
        "mixing": m["mixing"],
        "augmentation": m["augmentation"],
        "statistics": info["statistics"],
        "content_sha256": info["content_hashes"],
        "bytes": info["bytes_on_disk"],
    }
    if m["kind"] == "embeddings":
        fields["embed_dim"] = m["embed_dim"]
    return _public(fields)


def dataset_card(store: LogitStore) -> str:
    """The whole card: front matter, a summary and how to read the store."""
    f = card_fields(store)
    front = yaml.safe_dump(f, sort_keys=False, allow_unicode=False, width=1000)
    stats = f["statistics"]
    lines = [
        "---",
        front.rstrip("\n"),
        "---",
        "",
        f"# {f['pretty_name']}",
        "",
        f"Teacher `{f['teacher'].get('spec')}` (weights sha256 `{f['teacher'].get('weights_sha256')}`) on "
        f"`{f['dataset']['spec']}` ({f['num_samples']} samples, fingerprint `{f['dataset']['fingerprint']}`).",
        f"{len(f['completed_epochs'])} of {f['epochs']} epochs complete, "
        + (f"top-{f['k']} of {f['num_classes']} classes" if f["kind"] == "logits" else f"dimension {f['embed_dim']}")
        + f", format version {f['format_version']} ({f['backend']}), {f['bytes']} bytes.",
        f"Augmentation hash `{f['augmentation'].get('hash')}`, global seed {f['global_seed']}.",
        "",
    ]
    shown = {k: v for k, v in stats.items() if v is not None}
    if shown:
        lines += ["| statistic | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown.items()]
        lines.append("")
    return "\n".join(lines) + "\n" + HOW_TO_READ


def _public(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _public(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_public(v) for v in data]
    return redact_text(data) if isinstance(data, str) else data
