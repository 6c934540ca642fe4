"""`supervised`: plain training on labels, no teacher: cross-entropy on the (mixed) labels, e.g. to train a teacher."""

from dataclasses import dataclass

from distill.recipe import MethodSpec


@dataclass
class SupervisedLoss:
    label_smoothing: float = 0.0  # of the cross-entropy


SPEC = MethodSpec(method="recipes.supervised.method:Supervised", loss=SupervisedLoss, teacher="none")
