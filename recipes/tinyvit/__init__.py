"""`tinyvit`: TinyViT pretraining distillation (Wu et al., ECCV 2022), and logit distillation at large: the
student learns the teacher's distribution, a live model's or a store's (its top-k and tail rebuilt).

`loss.kd` picks the loss on that distribution:

- `hinton` (default; Hinton et al., 2015): soft-target cross-entropy against softmax(teacher / T), times T^2.
  TinyViT's loss with T = 1 and no label term (label_weight 0).
- `nkd`, normalized KD (Yang et al., ICCV 2023): the target class's term plus `gamma` T^2 times the
  renormalised non-target classes' soft cross-entropy.
- `dkd`, decoupled KD (Zhao et al., CVPR 2022): `alpha` TCKD (target vs the rest) + `beta` NCKD (among the
  non-target classes), times T^2.
- `dist` (Huang et al., NeurIPS 2022): `beta` (1 - Pearson correlation) across classes + `gamma` (1 - Pearson)
  across the batch, times T^2.

NKD and DKD need each image's class: its label, or the teacher's top-1 for an unlabelled image. The defaults
of each loss are its paper's ImageNet setting. An optional label term (`label_weight`) counts the labelled
images only, each weighing as much as one image of the KD term (SimCLRv2's weighting), so a recipe can mix a
few labels with a store over many unlabelled images.
"""

from dataclasses import dataclass, field
from typing import Literal

from distill.errors import RecipeError
from distill.recipe import MethodSpec


@dataclass
class NkdConfig:
    gamma: float = 1.5  # the paper's ImageNet setting (T = 1)


@dataclass
class DkdConfig:
    alpha: float = 0.5  # weight of TCKD; the paper's ImageNet setting (T = 1); CIFAR-100 uses 1.0 / 8.0 at T = 4
    beta: float = 0.5  # weight of NCKD, among the non-target classes


@dataclass
class DistConfig:
    beta: float = 1.0  # inter-class relation
    gamma: float = 1.0  # intra-class relation


@dataclass
class TinyVitLoss:
    kd: Literal["hinton", "nkd", "dkd", "dist"] = "hinton"  # the loss on the teacher's distribution
    temperature: float = 1.0  # T: both distributions softened by it, the loss times T^2
    distill_weight: float = 1.0  # weight of the KD term
    label_weight: float = 0.0  # weight of cross-entropy on the labelled images (TinyViT: 0)
    nkd: NkdConfig = field(default_factory=NkdConfig)  # settings of kd: nkd
    dkd: DkdConfig = field(default_factory=DkdConfig)  # settings of kd: dkd
    dist: DistConfig = field(default_factory=DistConfig)  # settings of kd: dist

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise RecipeError(f"temperature: expected a number > 0, got {self.temperature}")


SPEC = MethodSpec(method="recipes.tinyvit.method:TinyVit", loss=TinyVitLoss)
