"""Draw docs/data_path.png: a sample's path from the dataset to any number of students, through one store.

python3 -m uv run --frozen python tools/draw_data_path.py [--out docs/data_path.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

ROOT = Path(__file__).resolve().parent.parent

# (x, y, width, height, title, detail, colour): the boxes, left to right
BOXES = {
    "data": (0.2, 2.0, 2.0, 1.4, "dataset", "image id, label\n(stable ids)", "#e8eef7"),
    "view": (3.0, 2.0, 2.3, 1.4, "replayed view", "seed(global seed,\nepoch, id)", "#e8eef7"),
    "teacher": (6.1, 2.0, 2.0, 1.4, "teacher", "runs once per view\n(distill-save-logits)", "#fde9d9"),
    "store": (8.9, 1.7, 2.6, 2.0, "logit store", "per (epoch, id):\ntop-k logits, tail,\naugmentation seed", "#fff2cc"),
}
STUDENTS = ["student A\n(any architecture)", "student B\n(any batch size)", "student ...\n(distill-train)"]


def draw(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 3.9))
    ax.set_xlim(0, 15.2)
    ax.set_ylim(0.3, 5.15)
    ax.axis("off")
    for x, y, w, h, title, detail, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#333333"))
        ax.text(x + w / 2, y + h - 0.3, title, ha="center", va="center", fontsize=12, weight="bold")
        ax.text(x + w / 2, y + (h - 0.5) / 2, detail, ha="center", va="center", fontsize=9)
    arrows = [("data", "view"), ("view", "teacher"), ("teacher", "store")]
    for a, b in arrows:
        xa, ya, wa, ha = BOXES[a][:4]
        xb, yb, _, hb = BOXES[b][:4]
        ax.add_patch(FancyArrowPatch((xa + wa + 0.05, ya + ha / 2), (xb - 0.05, yb + hb / 2), arrowstyle="-|>",
                                     mutation_scale=18, color="#333333"))  # fmt: skip
    sx, sy, sw, sh = BOXES["store"][:4]
    for i, name in enumerate(STUDENTS):
        y = 3.75 - i * 1.55
        ax.add_patch(FancyBboxPatch((12.6, y), 2.3, 1.0, boxstyle="round,pad=0.05", fc="#e2f0d9", ec="#333333"))
        ax.text(13.75, y + 0.5, name, ha="center", va="center", fontsize=9)
        ax.add_patch(FancyArrowPatch((sx + sw + 0.05, sy + sh / 2), (12.55, y + 0.5), arrowstyle="-|>",
                                     mutation_scale=15, color="#333333"))  # fmt: skip
    ax.text(7.6, 4.55, "once: the teacher's pass", ha="center", fontsize=10, style="italic")
    ax.text(13.75, 4.95, "many: no teacher in the loop", ha="center", fontsize=10, style="italic")
    ax.text(7.6, 1.0, "each student replays the same views from the same seeds, so the stored record\n"
            "is the teacher's output on exactly the image the student sees", ha="center", fontsize=9.5)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "data_path.png")
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
