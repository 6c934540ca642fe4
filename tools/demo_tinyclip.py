"""TinyCLIP end to end on scikit-learn's digits with captions ("a photo of the number seven"), nothing downloaded:
  1. train a small CLIP teacher contrastively                          (distill-train, method clip)
  2. save its image embedding of every view and text embedding of every caption  (distill-save-logits;
     the recipes use no augmentation, so one stored epoch is replayed by every training epoch)
  3. distil a smaller CLIP student from that store (affinity mimicking) (distill-train, method tinyclip)
  4. the same student initialised by manual weight inheritance from the teacher, also from the store
  5. for comparison, the student with the live teacher
then print each model's zero-shot top-1 and write `demo_results.png`. Re-running in the same --out skips
finished steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from demo import ROOT, plot, run, train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo_tinyclip", help="where runs, store and plot go")
    parser.add_argument("--teacher-epochs", type=int, default=10, help="epochs of the teacher's training")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of every student")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    started = time.perf_counter()

    teacher = train(out, "teacher", "clip_digits_teacher.yaml", {"epochs": args.teacher_epochs})
    weights, store = out / "teacher" / "model.safetensors", out / "teacher.zarr"
    spec = f"open_clip:{teacher['student']}"
    run(["distill-save-logits", "--teacher", spec, "--checkpoint", str(weights), "--data", "digits-captions",
         "--out", str(store), "--epochs", "1", "--aug", "none", "--img-size", "32"])  # fmt: skip
    common = {"epochs": args.epochs, "teacher.source": f"store:{store}"}
    inherit = {"loss.inherit.model": teacher["student"], "loss.inherit.checkpoint": str(weights)}
    live = common | {"teacher.source": spec, "teacher.checkpoint": str(weights), "teacher.epochs": "strict"}
    runs = [
        teacher,
        train(out, "student_store", "tinyclip_digits.yaml", common),
        train(out, "student_inherited", "tinyclip_digits.yaml", common | inherit),
        train(out, "student_live", "tinyclip_digits.yaml", live),
    ]
    print(f"\n{'run':<18} {'model':<22} {'params':>9} {'teacher source':<30} {'zero-shot top-1':>15} {'wall s':>7}")
    for r in runs:
        source = r["teacher_source"].replace(str(ROOT) + "/", "")[-30:]
        print(
            f"{r['name']:<18} {r['student']:<22} {r['params']:>9,} {source:<30} {r['top1']:>15.2f} "
            f"{r['wall_seconds']:>7.1f}"
        )
    plot(runs, out / "demo_results.png")
    gap = abs(runs[1]["top1"] - runs[3]["top1"])
    print(f"\nstore vs live teacher, same student and views: |zero-shot top-1 difference| = {gap:.2f} points")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; plot: {out / 'demo_results.png'}")
    (out / "demo_results.json").write_text(json.dumps({"runs": runs, "store_vs_live_gap": gap}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
