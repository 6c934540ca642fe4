"""`minivit`: MiniViT weight distillation (Zhang et al., CVPR 2022). A weight-multiplexed student learns a
teacher's predictions and, from a live transformer teacher, its attention relations and hidden-state relations:

    loss = prediction_weight * prediction term (T = temperature, `prediction_form`)
         + attention_weight  * attention relation (the nine Q/K/V self-relations, soft CE as KL, over `layer_pairs`)
         + hidden_weight     * hidden relation (49 x MSE of normalised token Gram matrices, over `layer_pairs`)
         + label_weight      * cross-entropy on the (mixed) labels

The defaults are the reference's Mini-Swin setting (microsoft/Cream, MiniViT/Mini-Swin README and main.py):
Mini-Swin's soft cross-entropy, weights 1 / 1 / 0.1 and no label term, T = 1, one relation head (`--ar 1`),
and six layer pairs across all stages (`reference_layer_pairs`). The reference's Mini-DeiT setting is
`prediction_form: deit_kl` with `attention_weight: 0` and `hidden_weight: 0` (DeiT's soft distillation only,
`recipes/configs/minivit_deit_*_in1k.yaml`). docs/methods/minivit.md compares every point with the reference.

The relation terms come from the very forward passes that produce the logits (`relations.RelationCapture` hooks on
the student and the live teacher, recording only inside `loss`). The student is any timm ViT/DeiT or Swin, usually
a multiplexed `mini_deit_*` / `mini_swin_*` from `students.minivit`. Relation losses need the teacher's Q/K/V and
tokens, so a logit store (or an ensemble) can only teach the prediction term: set `loss.attention_weight: 0` and
`loss.hidden_weight: 0` to train from one.
"""

from dataclasses import dataclass, field
from typing import Literal

from distill.errors import RecipeError
from distill.recipe import MethodSpec


@dataclass
class MiniVitLoss:
    temperature: float = 1.0  # T of the prediction term
    # soft_ce: Mini-Swin's mean over the batch of CE(softmax(teacher / T), log_softmax(student / T)), no T^2;
    # deit_kl: DeiT's soft distillation (Mini-DeiT), KL(teacher / T || student / T) summed, x T^2 / (batch x classes)
    prediction_form: Literal["soft_ce", "deit_kl"] = "soft_ce"
    prediction_weight: float = 1.0  # weight of the prediction term
    attention_weight: float = 1.0  # attention-relation loss (needs a live teacher)
    hidden_weight: float = 0.1  # hidden-relation loss (needs a live teacher); the relation carries the x 49
    label_weight: float = 0.0  # optional cross-entropy on the (mixed) labels; MiniViT uses none
    # Q/K/V widths are split into this many relation heads on both sides (the reference's --ar, default 1); 0: the
    # student's attention head count at each matched layer. It must divide the student's and the teacher's widths.
    relation_heads: int = 1
    # [student block, teacher block] index pairs into the models' transformer blocks (negative: from the end);
    # paired layers must have the same number of tokens. Empty (the default): the reference's pairs for the two
    # models, by its rule (recipes.minivit.relations.reference_layer_pairs): six over all stages for Mini-Swin.
    layer_pairs: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise RecipeError(f"temperature: expected a number > 0, got {self.temperature}")
        for name in ("prediction_weight", "attention_weight", "hidden_weight", "label_weight"):
            if getattr(self, name) < 0:
                raise RecipeError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        if not (self.prediction_weight or self.attention_weight or self.hidden_weight or self.label_weight):
            raise RecipeError("every weight is 0, so there is nothing to train on")
        if self.relation_heads < 0:
            raise RecipeError(
                f"relation_heads: expected an integer >= 0 (0: the student's heads), got {self.relation_heads}"
            )
        for i, pair in enumerate(self.layer_pairs):
            if len(pair) != 2:
                raise RecipeError(f"layer_pairs[{i}]: expected [student block, teacher block], got {pair}")

    @property
    def uses_relations(self) -> bool:
        return self.attention_weight > 0 or self.hidden_weight > 0


SPEC = MethodSpec(method="recipes.minivit.method:MiniVit", loss=MiniVitLoss)
