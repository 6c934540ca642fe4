"""`cream`: Cream of the Crop, one-shot NAS with prioritized paths (Peng et al., NeurIPS 2020).

The run trains the weight-sharing supernet (`students.supernet`, timm's `cream_supernet`), one sampled path per
step, on the ordinary trainer. Once the board holds paths, the meta-matching network picks the sampled path's
teacher among them and the loss is (m * KD + (2 - m) * CE) / 2 with m = sigmoid(-best matching score); before
that it is plain CE. After each step the path's top-1 on a fixed *held-out* batch decides whether it enters the
board (never its accuracy on the training batch it was just fit to). Every `meta_update_every` steps the meta
network gets a one-step unrolled (bilevel) update. The first `board_start_epoch` epochs are plain CE with no
board (early scores mean little). A teacher (`teacher.source`, e.g. a logit store) adds an outer KD term with
weight `kd_weight`.

At the end the board is printed and its best path within `flops_budget` (MFLOPs) exported from the supernet
(`path.safetensors`); a follow-up run under the recipe's `then` retrains it alone, built by name as timm's
`cream_path`, from the exported weights (`retrain_init: supernet`) or from scratch (`retrain_init: scratch`).

Held-out data: with `heldout: train` (the default) every `heldout_every`-th id of data.train (ids 0, N, 2N, ...)
is held out of the search's training and used only for board scores and the meta update's held-out loss;
`heldout: val` uses data.val instead (which then no longer measures the search independently). The search runs
on one process, in float32 (the meta update differentiates through an SGD step). Validation during the search
scores the board's best path (the first choice of every layer while the board is empty).

Three bugs of the reference implementation are avoided on purpose (see `board.py`).
"""

from dataclasses import dataclass
from typing import Literal

from distill.errors import RecipeError
from distill.recipe import MethodSpec


@dataclass
class CreamLoss:
    flops_budget: float  # MFLOPs (2 per multiply-add, at data.img_size): the pick is the best board path under it
    board_size: int = 10
    board_flops_limit: float | None = None  # MFLOPs; paths above it never enter the board (null: any)
    board_start_epoch: int = 0  # epochs of plain CE before the board takes paths (early scores mean little)
    meta_update_every: int = 200  # steps between one-step unrolled meta updates
    meta_lr: float = 1e-3  # Adam on the meta-matching network (hypergradients are tiny; Adam rescales them)
    meta_hidden: int = 0  # hidden width of the meta network (0: linear)
    sampling: Literal["uniform", "weighted"] = "uniform"
    choice_weights: list[float] | None = None  # with sampling: weighted, one weight per choice (k3e4, k3e6, ...)
    heldout: Literal["train", "val"] = "train"  # where held-out data comes from (see the package docstring)
    heldout_every: int = 10  # with heldout: train, ids 0, N, 2N, ... of data.train are held out
    heldout_batch_size: int = 128  # the fixed board batch, and the meta update's held-out batches
    kd_weight: float = 1.0  # loss = prioritized loss + kd_weight * KD(student, teacher), with a teacher
    kd_temperature: float = 1.0
    retrain_init: Literal["supernet", "scratch"] = "supernet"  # the follow-up's start: the path's weights, or none

    def __post_init__(self) -> None:
        for name in ("board_size", "meta_update_every", "heldout_batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.heldout_every < 2:
            raise RecipeError(f"heldout_every: expected an integer >= 2, got {self.heldout_every}")
        if self.flops_budget <= 0:
            raise RecipeError(f"flops_budget: expected MFLOPs > 0, got {self.flops_budget}")
        if self.board_start_epoch < 0:
            raise RecipeError(f"board_start_epoch: expected an integer >= 0, got {self.board_start_epoch}")
        if (self.sampling == "weighted") != (self.choice_weights is not None):
            raise RecipeError("choice_weights: give them with sampling: weighted, and only then")


SPEC = MethodSpec(method="recipes.cream.method:Cream", loss=CreamLoss, teacher="optional")
