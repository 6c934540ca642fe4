"""Distillation that pays, on scikit-learn's digits: few labels and many images, ensembles, and the logit losses.

    python tools/demo_semisup.py [--out runs/demo_semisup] [--seeds 0,1,2] [--epochs 10]

1. Semi-supervised (SimCLRv2's third step): 10% of the training images keep their labels (stratified, fixed;
   another fraction with --labelled);
   three teachers learn from those only (no other label is used anywhere), the best one's store covers all
   training images, and students (3 seeds each) learn (a) from the 10% labels alone, as many steps as the
   others, (b) from the store over all images, (c) from the store and the 10% labels, and, for reference, (d)
   from all labels; (b) and (c) again from the store of the three teachers' ensemble. Two students: the
   convolutional resnet10t, and a plain ViT (DeiT's architecture, 0.68M parameters), which has no convolution to
   lean on when images are few (DeiT's case for a convolutional teacher).
   With --member-labels disjoint, teacher i learns from the i-th third of each class's labelled images instead
   (bagging: members that err differently; the same labels in all), in --out/semi_disjoint.
   Every view of this part is recipes/configs/digits_augment.yaml's (no flip, RandAugment): with few labels
   the views matter most, and a mirrored digit is no digit.
2. Ensembles (MEAL V2): three teachers trained on all labels; students from the store of the best one and
   from the store of their ensemble. Every ensemble's member i trains with seed i.
3. Losses: students from the best teacher's store with Hinton KD, NKD, DKD and DIST.

Every step is a toolkit command; re-running in the same --out skips what is finished. Prints the tables (mean
and spread over the seeds) and writes `results.json` and `results.png`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from distill.data_digits import prepare_digits

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(sys.executable).parent
STUDENT = {"student.model": "resnet10t", "student.kwargs": "{}"}  # the ensemble and loss parts' student
SEMI_STUDENTS = {  # the semi-supervised part's: a convolutional network and a plain ViT (4 px patches, 64 tokens)
    "resnet10t": STUDENT,
    "vit": {"student.model": "deit_tiny_patch16_224",
            "student.kwargs": "{img_size: 32, patch_size: 4, embed_dim: 96, depth: 6, num_heads: 3}"},
}  # fmt: skip
TEACHERS = ("resnet18", "resnet26", "resnet34")  # the ensemble's members (each part trains its own)
SEMI_ROWS = ("a_labels_10pct", "b_kd", "c_kd_labels_10pct", "b_kd_ensemble", "c_kd_ensemble_labels_10pct",
             "d_all_labels")  # fmt: skip
SEMI_AUG = "recipes/configs/digits_augment.yaml"  # views for few labels: no flip, RandAugment


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run([str(SCRIPTS / cmd[0]), *cmd[1:]], check=True, cwd=ROOT)


def train(out: Path, recipe: str, sets: dict[str, Any]) -> float:
    """Validation top-1 of a distill-train run of recipes/configs/`recipe` with --set overrides (a finished
    run is read, not repeated)."""
    if not (out / "summary.json").exists():
        args = [a for k, v in (sets | {"output_dir": str(out)}).items() for a in ("--set", f"{k}={v}")]
        run(["distill-train", f"recipes/configs/{recipe}", *args])
    return json.loads((out / "summary.json").read_text())["top1"]


def save(out: Path, teacher: str, weights: Path | None, data: str, epochs: int, seed: int, aug: str = "basic") -> Path:
    """A store of the teacher's whole distribution (k = 10 of 10 classes) over `data`, the views of `seed`
    (a re-run resumes an interrupted store and finds a finished one complete)."""
    checkpoint = ["--checkpoint", str(weights)] if weights else []
    run(["distill-save-logits", "--teacher", teacher, *checkpoint, "--data", data, "--out", str(out),
         "--epochs", str(epochs), "--k", "10", "--aug", aug, "--img-size", "32", "--batch-size", "128",
         "--seed", str(seed)])  # fmt: skip
    return out


def split_rows(fraction: float, seed: int = 0) -> list[tuple[str, str]]:
    """(path, label) of every digits training image, the label kept for `fraction` of each class (stratified,
    fixed by `seed`) and empty for the others."""
    train = prepare_digits() / "train"
    rng = np.random.default_rng(seed)
    rows = []
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        keep = set(rng.choice(len(files), round(fraction * len(files)), replace=False).tolist())
        rows += [(str(f), folder.name if i in keep else "") for i, f in enumerate(files)]
    return rows


def read_rows(path: Path) -> list[tuple[str, str]] | None:
    if not path.exists():
        return None
    with open(path, newline="") as f:
        return [(row[0], row[1]) for row in list(csv.reader(f))[1:]]


def write_splits(out: Path, rows: list[tuple[str, str]]) -> tuple[str, str, int]:
    """CSVs of `split_rows`: the labelled images alone, and every image with only those labels (the other label
    cells empty). Returns both specs and the labelled count."""
    out.mkdir(parents=True, exist_ok=True)
    for name, kept in (("labelled.csv", [r for r in rows if r[1]]), ("partial.csv", rows)):
        with open(out / name, "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *kept])
    labelled = sum(1 for r in rows if r[1])
    return f"csv:{out / 'labelled.csv'}", f"csv:{out / 'partial.csv'}", labelled


def spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo_semisup")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the ensemble and loss students")
    parser.add_argument("--semi-epochs", type=int, default=30, help="epochs of the semi-supervised students")
    parser.add_argument("--teacher-epochs", type=int, default=200, help="epochs of the few-label teachers")
    parser.add_argument("--labelled", type=float, default=0.1,
                        help="the semi part's fraction of each class that keeps its labels (rows named 10pct use it)")  # fmt: skip
    parser.add_argument("--member-labels", choices=("shared", "disjoint"), default="shared",
                        help="the semi part's teachers learn from all the labelled images, or each from its third")  # fmt: skip
    parser.add_argument("--parts", default="semi,ensemble,losses", help="any of semi, ensemble, losses")
    parser.add_argument("--semi-students", default=",".join(SEMI_STUDENTS), help="any of " + ", ".join(SEMI_STUDENTS))
    parser.add_argument("--semi-rows", default=",".join(SEMI_ROWS), help="any of " + ", ".join(SEMI_ROWS))
    args = parser.parse_args()
    for option, known in (("--semi-students", SEMI_STUDENTS), ("--semi-rows", SEMI_ROWS)):
        unknown = sorted(set(getattr(args, option[2:].replace("-", "_")).split(",")) - set(known))
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)}; expected any of {', '.join(known)}")
    out, seeds, parts = (ROOT / args.out).resolve(), [int(s) for s in args.seeds.split(",")], args.parts.split(",")
    if not 0 < args.labelled < 1:
        parser.error(f"--labelled: expected a fraction in (0, 1), got {args.labelled}")
    semi = out / ("semi" if args.member_labels == "shared" else "semi_disjoint")
    if "semi" in parts:  # finished runs are read, not repeated: never those of other splits
        rows, held = split_rows(args.labelled), semi / "partial.csv"
        if read_rows(held) not in (None, rows):
            parser.error(f"--labelled {args.labelled}: {held} holds other splits; choose another --out")
    started, results = time.perf_counter(), {}
    common = {"epochs": args.epochs} | STUDENT
    if "semi" in parts:
        results["semi"] = semi_supervised(semi, seeds, args, common, rows)
    if "ensemble" in parts or "losses" in parts:
        members = train_members(out, {})
        best = max(members, key=members.get)
        results["teachers"] = members
        if "ensemble" in parts:
            results["ensemble"] = ensemble(out, seeds, best, common)
        if "losses" in parts:
            results["losses"] = losses(out, seeds, best, common)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report(results, out / "results.png")
    print(f"\nfinished in {time.perf_counter() - started:.0f} s; {out / 'results.png'}")
    return 0


def semi_supervised(
    out: Path, seeds: list[int], args: argparse.Namespace, common: dict, rows: list[tuple[str, str]]
) -> dict[str, Any]:
    """The three TEACHERS trained on the 10% (or each on its third of it, --member-labels disjoint); students
    (a)-(d), (b) and (c) from the store of the best of them, and (b) and (c) again from the store of their
    ensemble; for each of --semi-students, from the same stores (a store is the teacher's, whatever the
    student)."""
    labelled, partial, count = write_splits(out, rows)
    teacher = {"epochs": args.teacher_epochs, "batch_size": 32, "augmentation": SEMI_AUG}
    data = write_thirds(out, rows) if args.member_labels == "disjoint" else [labelled] * len(TEACHERS)
    members = train_members(out, teacher, data)
    best = max(members, key=members.get)
    weights = {m: out / f"teacher_{m}" / "model.safetensors" for m in TEACHERS}
    ensemble_spec = "ensemble:" + ",".join(f"timm:{m}@{weights[m]}" for m in TEACHERS)
    wanted = [row for row in SEMI_ROWS if row in args.semi_rows.split(",")]
    # row suffix -> (store name, teacher spec, checkpoint)
    teachers = {"": (best, f"timm:{best}", weights[best]), "_ensemble": ("ensemble", ensemble_spec, None)}
    needed = {s: t for s, t in teachers.items() if {f"b_kd{s}", f"c_kd{s}_labels_10pct"} & set(wanted)}
    stores = {seed: {s: save(out / f"store_{name}_{seed}.zarr", spec, ckpt, partial, args.semi_epochs, seed, SEMI_AUG)
                     for s, (name, spec, ckpt) in needed.items()}
              for seed in seeds}  # fmt: skip
    common = common | {"epochs": args.semi_epochs, "augmentation": SEMI_AUG}
    scale = round(1 / args.labelled)  # (a) sees that fraction of the images: as many steps as the others
    students = {
        name: semi_students(out / name, seeds, stores, common | SEMI_STUDENTS[name], labelled, partial, wanted, scale)
        for name in args.semi_students.split(",")
    }
    return {
        "labelled_images": count,
        "member_labels": args.member_labels,
        "best_member": best,
        "teacher_top1": members[best],
        "members_top1": members,
    } | students


def write_thirds(out: Path, rows: list[tuple[str, str]]) -> list[str]:
    """One CSV per member of TEACHERS: member i gets every len(TEACHERS)-th labelled image of each class from the
    i-th on (disjoint; together, every labelled image). Returns their specs."""
    by_class: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        if row[1]:
            by_class.setdefault(row[1], []).append(row)
    specs = []
    for i in range(len(TEACHERS)):
        kept = [row for labelled in by_class.values() for row in labelled[i :: len(TEACHERS)]]
        with open(out / f"labelled_member{i}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *kept])
        specs.append(f"csv:{out / f'labelled_member{i}.csv'}")
    return specs


def train_members(out: Path, sets: dict[str, Any], data: list[str] | None = None) -> dict[str, float]:
    """The ensemble's members, member i with seed i (init and batch order: a deep ensemble's diversity,
    Lakshminarayanan et al. 2017; retrained with one seed, the 10%-label members' ensemble scored under its best
    member) and, given `data`, from data[i]. Returns each member's validation top-1."""
    return {
        m: train(out / f"teacher_{m}", "supervised_digits.yaml",
                 sets | {"student.model": m, "seed": i} | ({"data.train": data[i]} if data else {}))
        for i, m in enumerate(TEACHERS)
    }  # fmt: skip


def semi_students(
    out: Path,
    seeds: list[int],
    stores: dict[int, dict[str, Path]],
    common: dict,
    labelled: str,
    partial: str,
    wanted: list[str],
    scale: int,
) -> dict[str, Any]:
    """The `wanted` rows of SEMI_ROWS, (a) to (d) and (b) and (c) from the ensemble's store, of one student over
    the seeds, and the ensemble's gain over its best member seed by seed where both are wanted."""
    rows: dict[str, list[float]] = {k: [] for k in wanted}  # in SEMI_ROWS' order
    for seed in seeds:
        runs = {"a_labels_10pct": ("a", "supervised_digits.yaml", {"data.train": labelled, "epochs": common["epochs"] * scale}),
                "d_all_labels": ("d", "supervised_digits.yaml", {})}  # fmt: skip
        for suffix, store in stores[seed].items():
            kd = {"data.train": partial, "teacher.source": f"store:{store}"}
            runs[f"b_kd{suffix}"] = (f"b{suffix}", "tinyvit_digits.yaml", kd)
            runs[f"c_kd{suffix}_labels_10pct"] = (f"c{suffix}", "tinyvit_digits.yaml", kd | {"loss.label_weight": 1})
        for key in rows:
            name, recipe, sets = runs[key]
            rows[key].append(train(out / f"{name}_{seed}", recipe, common | {"seed": seed} | sets))
    pairs = [("b_kd_ensemble", "b_kd"), ("c_kd_ensemble_labels_10pct", "c_kd_labels_10pct")]
    return {k: spread(v) for k, v in rows.items()} | paired(rows, pairs)


def paired(rows: dict[str, list[float]], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Each (row, baseline) pair of rows (an ensemble's store against its member's, a loss against Hinton KD)
    seed by seed: the same student, views and batches, one difference, so the seeds' noise cancels in the
    difference; pairs with a row missing are skipped."""
    out = {}
    for row, baseline in pairs:
        if row in rows and baseline in rows:
            diff = [r - b for r, b in zip(rows[row], rows[baseline], strict=True)]
            sem = statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0
            wins = {
                "over": sum(d > 0 for d in diff),
                "equal": sum(d == 0 for d in diff),
                "under": sum(d < 0 for d in diff),
            }
            out[f"{row} - {baseline}"] = {"mean": statistics.mean(diff), "sem": sem, "diffs": diff} | wins
    return {"paired": out} if out else {}


def member_store(out: Path, member: str, seed: int, epochs: int) -> Path:
    weights = out / f"teacher_{member}" / "model.safetensors"
    return save(out / f"store_{member}_{seed}.zarr", f"timm:{member}", weights, "digits", epochs, seed)


def ensemble(out: Path, seeds: list[int], best: str, common: dict) -> dict[str, Any]:
    spec = "ensemble:" + ",".join(f"timm:{m}@{out / f'teacher_{m}' / 'model.safetensors'}" for m in TEACHERS)
    rows: dict[str, list[float]] = {f"best_member_{best}": [], "ensemble_of_3": []}
    for seed in seeds:
        stores = {f"best_member_{best}": member_store(out, best, seed, common["epochs"]),
                  "ensemble_of_3": save(out / f"store_ensemble_{seed}.zarr", spec, None, "digits", common["epochs"], seed)}  # fmt: skip
        for name, store in stores.items():
            sets = common | {"seed": seed, "teacher.source": f"store:{store}"}
            rows[name].append(train(out / f"{name}_{seed}", "tinyvit_digits.yaml", sets))
    return {k: spread(v) for k, v in rows.items()} | paired(rows, [("ensemble_of_3", f"best_member_{best}")])


def losses(out: Path, seeds: list[int], best: str, common: dict) -> dict[str, Any]:
    rows: dict[str, list[float]] = {k: [] for k in ("hinton", "nkd", "dkd", "dist")}
    for seed in seeds:
        store = member_store(out, best, seed, common["epochs"])
        for kd in rows:
            sets = common | {"seed": seed, "teacher.source": f"store:{store}", "loss.kd": kd}
            rows[kd].append(train(out / f"loss_{kd}_{seed}", "tinyvit_digits.yaml", sets))
    return {k: spread(v) for k, v in rows.items()} | paired(rows, [(kd, "hinton") for kd in ("nkd", "dkd", "dist")])


def is_row(value: Any) -> bool:
    """A table row: a spread() over the seeds (not one of the single figures beside them)."""
    return isinstance(value, dict) and "values" in value


def report(results: dict[str, Any], path: Path) -> None:
    tables = [(f"semi-supervised, {student} student", rows) for student, rows in results.get("semi", {}).items()
              if isinstance(rows, dict) and any(is_row(v) for v in rows.values())]  # fmt: skip
    tables += [(name, rows) for name, rows in results.items() if name in ("ensemble", "losses")]
    for name, rows in tables:
        print(f"\n{name}: top-1 (%) over seeds, mean +- std")
        for key, value in rows.items():
            if is_row(value):
                print(f"  {key:<28} {value['mean']:6.2f} +- {value['std']:.2f}   {value['values']}")
        for key, pair in rows.get("paired", {}).items():
            print(f"  {key}, seed by seed: {pair['mean']:+.2f} +- {pair['sem']:.2f} (standard error); "
                  f"over in {pair['over']}, equal in {pair['equal']}, under in {pair['under']} seeds")  # fmt: skip
    if not tables:
        return
    ncols = min(2, len(tables))
    nrows = -(-len(tables) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(tables) :]:
        ax.axis("off")
    for ax, (name, rows) in zip(axes.flat, tables, strict=False):
        keys = [k for k, v in rows.items() if is_row(v)]
        means, stds = [rows[k]["mean"] for k in keys], [rows[k]["std"] for k in keys]
        ax.bar(range(len(keys)), means, yerr=stds, capsize=4, color="tab:blue")
        for i, key in enumerate(keys):  # each seed's run: on 360 images one image is 0.28 points
            ax.plot([i] * len(rows[key]["values"]), rows[key]["values"], "o", color="tab:orange", ms=4, zorder=3)
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
        low = min(m - s for m, s in zip(means, stds, strict=True))
        ax.set(ylim=(max(0, low - 5), 100), ylabel="validation top-1 (%)", title=name)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
