"""`minivit`: MiniViT weight distillation (Zhang et al., CVPR 2022). A weight-multiplexed student learns a
live transformer teacher's predictions, attention relations and hidden-state relations:

    loss = prediction_weight * soft_ce(student logits, softmax(teacher logits / T)) * T^2
         + attention_weight  * attention relation (Q/K/V self-relations, KL, over `layer_pairs`)
         + hidden_weight     * hidden relation (MSE of token Gram matrices, over `layer_pairs`)

The paper uses T = 1 and weights 1 / 1 / 0.1. The relation terms come from the very forward passes that
produce the logits (`relations.RelationCapture` hooks on the student and the live teacher, recording only
inside `loss`). The student is any timm ViT/DeiT or Swin, usually a multiplexed `mini_deit_*` /
`mini_swin_*` from `students.minivit`, whose shared weights can start from a trained unshared model with
`student.kwargs.init_from: PATH`.

Relation losses need the teacher's Q/K/V and tokens, so a logit store (or an ensemble) can only teach the
prediction term: set `loss.attention_weight: 0` and `loss.hidden_weight: 0` to train from one.
"""

from dataclasses import dataclass, field

from distill.errors import RecipeError
from distill.recipe import MethodSpec


@dataclass
class MiniVitLoss:
    temperature: float = 1.0  # T of the prediction term (the loss is scaled by T^2)
    prediction_weight: float = 1.0  # soft cross-entropy against the teacher's distribution
    attention_weight: float = 1.0  # attention-relation loss (needs a live teacher)
    hidden_weight: float = 0.1  # hidden-relation loss (needs a live teacher)
    label_weight: float = 0.0  # optional cross-entropy on the (mixed) labels; MiniViT uses none
    # Q/K/V widths are split into this many relation heads on both sides; 0: the student's attention head count
    # at each matched layer. It must divide the student's and the teacher's qkv widths.
    relation_heads: int = 0
    # [student block, teacher block] index pairs into the models' transformer blocks (negative: from the end).
    # Paired layers must have the same number of tokens. Default: the last blocks.
    layer_pairs: list[list[int]] = field(default_factory=lambda: [[-1, -1]])

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
        if (self.attention_weight or self.hidden_weight) and not self.layer_pairs:
            raise RecipeError("layer_pairs: relation losses need at least one [student block, teacher block] pair")
        for i, pair in enumerate(self.layer_pairs):
            if len(pair) != 2:
                raise RecipeError(f"layer_pairs[{i}]: expected [student block, teacher block], got {pair}")

    @property
    def uses_relations(self) -> bool:
        return self.attention_weight > 0 or self.hidden_weight > 0


SPEC = MethodSpec(method="recipes.minivit.method:MiniVit", loss=MiniVitLoss)
