"""`cream`: Cream of the Crop, one-shot NAS with prioritized paths (Peng et al., NeurIPS 2020).

The run trains the weight-sharing supernet (`students.supernet`, timm's `cream_supernet`), one sampled path per
step, on the ordinary trainer. Paths are drawn with the reference's per-layer prior over the six ops (its
PRE_PROB; `sampling: uniform` is the option). Once the board holds paths, the meta-matching network picks the
sampled path's teacher among them and the loss is (m * KD + (2 - m) * CE) / 2 with m = sigmoid(-best matching
score); before that it is plain CE (label smoothing 0.1, as the reference). After each step the path's top-1
on a fixed *held-out* batch, in eval mode, decides whether it enters the board: when the board is full it must
beat the worst entry by more than `admission_margin` points, or beat it at all with fewer FLOPs (the
reference's rule). Every `meta_update_every` steps the meta network gets a one-step unrolled (bilevel) update.
The first `board_start_epoch` epochs are plain CE with no board (the reference's 21 of 120: its
META_STA_EPOCH = 20 tested as `epoch > 20`). A teacher (`teacher.source`, e.g. a logit store) adds an outer KD
term with weight `kd_weight`.

At the end the board is printed and its best path within `flops_budget` (MFLOPs) exported from the supernet
(`path.safetensors`, BN statistics recalibrated on `recalibration_batches` training batches); a follow-up run
under the recipe's `then` retrains it alone, built by name as timm's `cream_path`, from scratch as the
reference does (`retrain_init: scratch`, the default) or from the exported weights (`retrain_init: supernet`).

Held-out data: with `heldout: train` (the default) every `heldout_every`-th id of data.train (ids 0, N, 2N, ...)
is held out of the search's training and used only for board scores and the meta update's held-out loss;
`heldout: val` uses data.val instead (which then no longer measures the search independently). The search runs
on one process, in float32 (the meta update differentiates through an SGD step). Validation during the search
scores the board's best path (the first choice of every layer while the board is empty).

Three bugs of the reference implementation are avoided on purpose (see `board.py`); every other difference
from it is listed, with its reason, in docs/methods/cream.md.
"""

from dataclasses import dataclass
from typing import Literal

from distill.errors import RecipeError
from distill.recipe import MethodSpec

# The reference's PRE_PROB: the probability of each op (k3e4, k3e6, k5e4, k5e6, k7e4, k7e6) at every layer.
REFERENCE_PRIOR = (0.05, 0.2, 0.05, 0.5, 0.05, 0.15)


@dataclass
class CreamLoss:
    flops_budget: float  # MFLOPs (2 per multiply-add, at data.img_size): the pick is the best board path under it
    board_size: int = 10  # paths the board keeps
    board_flops_limit: float | None = None  # MFLOPs; paths above it never enter the board (null: any)
    board_start_epoch: int = 21  # epochs of plain CE before the board takes paths (the reference: 21 of 120)
    admission_margin: float = 5.0  # top-1 points a path must gain over the worst entry of a full board
    meta_update_every: int = 200  # steps between one-step unrolled meta updates
    meta_lr: float = 1e-3  # Adam on the meta-matching network (hypergradients are tiny; Adam rescales them)
    meta_hidden: int = 0  # hidden width of the meta network (0: linear, as the reference)
    meta_input: Literal["slice", "per_sample"] = "slice"  # the reference's concatenated slice, or per sample
    meta_slice: int = 4  # images of the board's batch the meta network reads (the reference's SLICE)
    sampling: Literal["prior", "uniform"] = "prior"  # per-layer draw of a path: the reference's prior, or uniform
    choice_weights: list[float] | None = None  # with sampling: prior, one per choice (null: REFERENCE_PRIOR)
    skip_weight: float = 0.0  # weight of skipping a layer (never a stage's first), beside choice_weights
    label_smoothing: float = 0.1  # of the CE terms, as the reference's search
    heldout: Literal["train", "val"] = "train"  # where held-out data comes from (see the package docstring)
    heldout_every: int = 10  # with heldout: train, ids 0, N, 2N, ... of data.train are held out
    heldout_batch_size: int = 128  # the fixed board batch, and the meta update's held-out batches
    kd_weight: float = 1.0  # loss = prioritized loss + kd_weight * KD(student, teacher), with a teacher
    kd_temperature: float = 1.0  # T of the outer KD term
    recalibration_batches: int = 20  # training batches that set the exported path's BN statistics (0: keep)
    retrain_init: Literal["scratch", "supernet"] = "scratch"  # the follow-up's start: none, or the path's weights
    retrain_drop_rate: float = 0.2  # dropout before the classifier of the retrained path (the retrain configs')

    def __post_init__(self) -> None:
        for name in ("board_size", "meta_update_every", "heldout_batch_size", "meta_slice"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.heldout_every < 2:
            raise RecipeError(f"heldout_every: expected an integer >= 2, got {self.heldout_every}")
        if self.flops_budget <= 0:
            raise RecipeError(f"flops_budget: expected MFLOPs > 0, got {self.flops_budget}")
        for name in ("board_start_epoch", "recalibration_batches", "admission_margin", "skip_weight"):
            if getattr(self, name) < 0:
                raise RecipeError(f"{name}: expected a value >= 0, got {getattr(self, name)}")
        for name in ("label_smoothing", "retrain_drop_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise RecipeError(f"{name}: expected a value in [0, 1), got {getattr(self, name)}")
        if self.sampling == "uniform" and (self.choice_weights is not None or self.skip_weight):
            raise RecipeError("choice_weights: give them (and skip_weight) with sampling: prior, not uniform")


SPEC = MethodSpec(method="recipes.cream.method:Cream", loss=CreamLoss, teacher="optional")
