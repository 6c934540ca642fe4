"""`tinyclip`: distils a CLIP teacher into a student by affinity mimicking (Wu et al., ICCV 2023), and `clip`,
contrastive CLIP training (a teacher, or a baseline). The method, its reference setting and every deviation kept:
docs/methods/tinyclip.md.

Affinity mimicking: the student's image-to-text and text-to-image affinities inside the batch, s I T^T and
s T I^T at a fixed scale s, are trained toward the teacher's. The teacher's embeddings come from a live
open_clip model or from an embeddings store, whose stored embeddings rebuild the teacher's affinities for any
student batch size. An optional contrastive term on the student's own features takes weight 1 - alpha.

The student is an open_clip config (e.g. TinyCLIP-ViT-8M-16-Text-3M, registered by `students.tinyclip`) or a
pruned model's config JSON. Weight inheritance:

- manual (`loss.inherit`): the student starts from a bigger CLIP's weights, blocks at a uniform stride and the
  leading widths, channels and heads (ViT, ResNet and text towers; `inheritance.py`);
- automatic (`loss.prune`): one stage of progressive pruning is two runs, as a recipe's `then` chains them. The
  mask-learning run trains hard-concrete masks over hidden dims, heads and MLP units (`masks.py`) for the
  stage's prune steps (`loss.prune.steps`, or the whole run), with the one-sided Lagrangian penalty toward a
  target ramped from 0 over `ramp_steps`; the masks and multipliers have their own AdamW (constant rates, ascent
  on the multipliers), stepped after the weights'. At its end the final masks are applied and the model
  physically pruned into `output_dir/pruned_model.json` + `pruned_model.safetensors`, the run's result. The
  follow-up run without `loss.prune` distils that pruned model with a fresh optimizer and schedule: the rest of
  the stage. The next stage's mask-learning run starts from the distilled model. model.safetensors of a
  mask-learning run holds the masked model (keys `model.*`, `masks.*`, `lagrangian.*`, `step`).

Validation is zero-shot classification with class-name prompts.
"""

from dataclasses import dataclass, field
from typing import Literal

from distill.errors import RecipeError
from distill.recipe import MethodSpec

TOWERS = ("image", "text")


@dataclass
class ZeroShotConfig:
    # prompts with "{}" for the class name, or "openai_imagenet": CLIP's 80 ImageNet templates (open_clip's)
    templates: list[str] | Literal["openai_imagenet"] = field(default_factory=lambda: ["a photo of the number {}"])
    # class names in label order, or "imagenet": open_clip's 1,000 ImageNet names; default: data.val's classes
    class_names: list[str] | Literal["imagenet"] | None = None


@dataclass
class ClipLoss:
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)  # the validation metric's prompts


@dataclass
class InheritConfig:
    model: str  # the open_clip config of the weights' source (usually the teacher)
    checkpoint: str  # its weights (.safetensors, or .pth read with weights_only)


@dataclass
class PruneConfig:
    """The mask-learning run of one automatic-inheritance stage (see the package docstring); defaults are the
    reference's (microsoft/Cream TinyCLIP: l0module.py, optimizer.py, params.py, train.py)."""

    target_sparsity: float  # fraction of the blocks' attention and MLP parameters (both towers) to remove
    ramp_steps: int = 1000  # optimizer steps of the linear ramp from 0 to the target (--sparsity-warmup); 0: none
    steps: int | None = None  # mask-learning steps, the reference's --prune-step (null: the run's whole length)
    mask_lr: float = 0.02  # AdamW rate of log_alpha, constant (the reference's lr_l0)
    lagrangian_lr: float = 0.02  # AdamW rate of the multipliers, by ascent (the reference's --l0lr -0.02)
    init_log_alpha: float = 10.0  # every gate open; clamped to [ln 0.01, ln 100] after each step
    init_lambda: float = 10.0  # both multipliers
    towers: list[str] = field(default_factory=lambda: list(TOWERS))  # the towers whose blocks are masked

    def __post_init__(self) -> None:
        if not 0 <= self.target_sparsity < 1:
            raise RecipeError(f"target_sparsity: expected a fraction in [0, 1), got {self.target_sparsity}")
        if self.ramp_steps < 0:
            raise RecipeError(f"ramp_steps: expected an integer >= 0, got {self.ramp_steps}")
        if self.steps is not None and self.steps < 1:
            raise RecipeError(f"steps: expected an integer >= 1 or null, got {self.steps}")
        if self.steps is not None and self.ramp_steps > self.steps:
            raise RecipeError(f"ramp_steps: {self.ramp_steps} steps of ramp do not fit in the {self.steps} steps")
        for name in ("mask_lr", "lagrangian_lr"):
            if not getattr(self, name) > 0:
                raise RecipeError(f"{name}: expected a number > 0, got {getattr(self, name)}")
        if not self.towers or len(set(self.towers)) != len(self.towers) or not set(self.towers) <= set(TOWERS):
            raise RecipeError(f"towers: expected distinct towers among {list(TOWERS)}, got {self.towers}")


@dataclass
class TinyClipLoss:
    alpha: float = 1.0  # affinity weight; the contrastive term gets 1 - alpha
    affinity_scale: float = 50.0  # the fixed logit scale of the affinities and of the contrastive term
    gather_with_grad: bool = True  # full cross-process gradients (the reference's scripts); 1 process: no-op
    inherit: InheritConfig | None = None  # manual inheritance: start from a bigger CLIP's weights
    prune: PruneConfig | None = None  # automatic inheritance: this run learns masks and prunes at its end
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)  # the validation metric's prompts


CLIP_SPEC = MethodSpec(method="recipes.tinyclip.method:Clip", loss=ClipLoss, teacher="none")
SPEC = MethodSpec(method="recipes.tinyclip.method:TinyClip", loss=TinyClipLoss, outputs="embeddings")
