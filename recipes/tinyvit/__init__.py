"""`tinyvit`: TinyViT pretraining distillation (Wu et al., ECCV 2022): soft-target cross-entropy against the
teacher's (sparse) distribution.

The teacher is a logit store or a live model; either way its distribution at temperature T is
softmax(teacher logits / T). TinyViT uses T = 1 and no label term (label_weight 0).
"""

from dataclasses import dataclass

from distill.recipe import MethodSpec


@dataclass
class TinyVitLoss:
    temperature: float = 1.0
    distill_weight: float = 1.0
    label_weight: float = 0.0


SPEC = MethodSpec(method="recipes.tinyvit.method:TinyVit", loss=TinyVitLoss)
