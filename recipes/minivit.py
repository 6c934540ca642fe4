"""MiniViT weight distillation: a weight-multiplexed student learns a live transformer teacher's predictions,
attention relations and hidden-state relations (Zhang et al., CVPR 2022).

    loss = prediction_weight * soft_ce(student logits, softmax(teacher logits / T)) * T^2
         + attention_weight  * attention relation (Q/K/V self-relations, KL, over `layer_pairs`)
         + hidden_weight     * hidden relation (MSE of token Gram matrices, over `layer_pairs`)

The paper uses T = 1 and weights 1 / 1 / 0.1. The relation terms come from the very forward passes that produce
the logits: `distill.relations.RelationCapture` hooks are put on the (unwrapped) student and on the live teacher's
model at the first `loss` call and kept; they record only inside `loss` and their records are dropped at its end,
so evaluation forwards record nothing and no activations outlive a step. Before training, `check_teacher` refuses
a teacher without a model and `build_student` checks the layer pairs, relation heads and (with one zero image
through both models) token counts, each error naming its `loss.` field. The student is any timm ViT/DeiT or Swin,
usually a multiplexed `mini_deit_*` / `mini_swin_*` from `students.minivit`, whose shared weights can start from a
trained unshared model with `student.kwargs.init_from: PATH`.

Relation losses need the teacher's Q/K/V and tokens, so a logit store (or an ensemble) can only teach the
prediction term: set `loss.attention_weight: 0` and `loss.hidden_weight: 0` to train from one.

`tiny_deit_teacher` / `tiny_deit_kwargs` build the small 32 px DeiT of `recipes/minivit_digits.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from distill.loader import mixed_targets
from distill.losses import soft_target_cross_entropy, soft_target_kd
from distill.method import Method, register_method
from distill.recipe import RecipeError, StudentConfig
from distill.relations import RelationCapture, attention_relation_loss, hidden_relation_loss, transformer_blocks
from teachers import Teacher

__all__ = ["MiniVit", "MiniVitLoss", "tiny_deit_kwargs", "tiny_deit_teacher"]


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


class _Capture(RelationCapture):
    """A RelationCapture that records only while `recording` is set (the trainer's evaluation forwards don't)."""

    recording = False

    def _store_qkv(self, name: str, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.recording:
            super()._store_qkv(name, module, args, output)

    def _store_tokens(self, name: str, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.recording:
            super()._store_tokens(name, module, args, output)


@register_method("minivit")
class MiniVit(Method):
    LossConfig = MiniVitLoss

    def __init__(self, loss: MiniVitLoss, num_classes: int) -> None:
        super().__init__(loss, num_classes)
        _validate(loss)
        self._captures: tuple[nn.Module, nn.Module, _Capture, _Capture] | None = None
        self._teacher_checked: tuple[nn.Module, list[nn.Module]] | None = None

    @property
    def uses_relations(self) -> bool:
        return self.cfg.attention_weight > 0 or self.cfg.hidden_weight > 0

    def _relation_fields(self) -> str:
        return " and ".join(
            f"loss.{name} is {getattr(self.cfg, name)}"
            for name in ("attention_weight", "hidden_weight")
            if getattr(self.cfg, name) > 0
        )

    # ---- checks before anything runs ---------------------------------------------------------------------

    def check_teacher(self, teacher: Teacher | None) -> None:
        """Refuse a teacher that cannot give what the loss asks for: relation terms need a live model."""
        if teacher is None:
            raise RecipeError("teacher.source: method 'minivit' needs a teacher: a live spec or store:PATH")
        if not self.uses_relations:
            return
        model = getattr(teacher, "model", None)
        if not isinstance(model, nn.Module):
            raise RecipeError(
                f"{self._relation_fields()}, but relation losses need a live teacher model and teacher "
                f"{teacher.spec} has none (a logit store holds only logits; an ensemble has several models). "
                "Set loss.attention_weight and loss.hidden_weight to 0 to train from it (prediction term only), "
                "or use a live transformer teacher"
            )
        self._teacher_checked = (model, self._check_layers(model, 1, "teacher"))

    def build_student(self, cfg: StudentConfig, img_size: int) -> nn.Module:
        model = super().build_student(cfg, img_size)
        if self.uses_relations:
            student_blocks = self._check_layers(model, 0, "student")
            if self._teacher_checked is not None:  # the trainer checks the teacher before building the student
                teacher, teacher_blocks = self._teacher_checked
                self._check_heads(student_blocks, teacher_blocks)
                self._check_tokens(model, teacher, img_size)
        return model

    def _check_tokens(self, student: nn.Module, teacher: nn.Module, img_size: int) -> None:
        """One zero image through both models: paired layers must have equal token counts (e.g. not a DeiT
        student against a distilled DeiT teacher with its extra token, or Swin layers of other window layouts)."""
        pairs = self.cfg.layer_pairs
        s_cap = RelationCapture(student, [pair[0] for pair in pairs])
        t_cap = RelationCapture(teacher, [pair[1] for pair in pairs])
        training = student.training
        try:
            with torch.no_grad():
                image = torch.zeros(1, 3, img_size, img_size)
                student.eval()(image)
                teacher(image.to(next(teacher.parameters()).device))
        except Exception:  # a model that cannot run this probe: the loss reports any mismatch at the first step
            return
        finally:
            s_cap.remove()
            t_cap.remove()
            student.train(training)
        for i, (s, t) in enumerate(zip(s_cap.layers, t_cap.layers, strict=True)):
            s_shape, t_shape = s_cap.qkv[s].shape[1:3], t_cap.qkv[t].shape[1:3]
            s_tokens, t_tokens = s_cap.tokens[s].shape[1], t_cap.tokens[t].shape[1]
            if s_shape != t_shape or s_tokens != t_tokens:
                raise RecipeError(
                    f"loss.layer_pairs[{i}]: student block {s} and teacher block {t} do not match token for token "
                    f"at data.img_size {img_size} (student: {s_tokens} tokens, Q/K/V rows x tokens "
                    f"{s_shape[0]} x {s_shape[1]}; teacher: {t_tokens} tokens, Q/K/V rows x tokens "
                    f"{t_shape[0]} x {t_shape[1]}); relation losses need equal token counts "
                    "(and for Swin the same window layout)"
                )

    def _check_layers(self, model: nn.Module, side: int, what: str) -> list[nn.Module]:
        """The paired blocks of `model` (side 0: student, 1: teacher); a RecipeError if any does not exist."""
        try:
            blocks = list(transformer_blocks(model).values())
        except TypeError as err:
            raise RecipeError(f"{self._relation_fields()}: relation losses need a transformer {what} ({err})") from None
        for i, pair in enumerate(self.cfg.layer_pairs):
            if not -len(blocks) <= pair[side] < len(blocks):
                raise RecipeError(
                    f"loss.layer_pairs[{i}][{side}]: {what} block {pair[side]} does not exist "
                    f"(the {what} has {len(blocks)} transformer blocks)"
                )
        return [blocks[pair[side]] for pair in self.cfg.layer_pairs]

    def _check_heads(self, student_blocks: list[nn.Module], teacher_blocks: list[nn.Module]) -> None:
        for i, (s, t) in enumerate(zip(student_blocks, teacher_blocks, strict=True)):
            heads = self._heads(s)
            for what, block in (("student", s), ("teacher", t)):
                width = block.attn.qkv.out_features // 3
                if width % heads:
                    source = f"is {heads}" if self.cfg.relation_heads else f"is 0, so the student's {heads} heads"
                    raise RecipeError(
                        f"loss.relation_heads {source}: that does not divide the {what}'s qkv width "
                        f"{width} at loss.layer_pairs[{i}]; set loss.relation_heads to a common divisor"
                    )

    def _heads(self, student_block: nn.Module) -> int:
        return self.cfg.relation_heads or int(student_block.attn.num_heads)

    # ---- the loss ----------------------------------------------------------------------------------------

    def loss(
        self, student: nn.Module, batch: dict[str, torch.Tensor], teacher: Teacher | None
    ) -> dict[str, torch.Tensor]:
        """Loss parts with a weight > 0 (`prediction`, `attention`, `hidden`, `label`) and their weighted sum."""
        if teacher is None:
            raise RecipeError("teacher.source: method 'minivit' needs a teacher")
        images, cfg = batch["image"], self.cfg
        captures = self._hook(getattr(student, "module", student), teacher) if self.uses_relations else ()
        for capture in captures:
            capture.recording = True
        try:
            logits = student(images)
            with torch.no_grad():
                teacher_logits = teacher.logits(images, int(batch["epoch"][0]), batch["id"])
            for capture in captures:
                capture.recording = False
            parts: dict[str, torch.Tensor] = {}
            if cfg.prediction_weight > 0:
                parts["prediction"] = soft_target_kd(logits, teacher_logits, cfg.temperature)
            if captures:
                attention, hidden = self._relation_losses(*captures)
                if cfg.attention_weight > 0:
                    parts["attention"] = attention
                if cfg.hidden_weight > 0:
                    parts["hidden"] = hidden
            if cfg.label_weight > 0:
                parts["label"] = soft_target_cross_entropy(logits, mixed_targets(batch, self.num_classes))
        finally:
            for capture in captures:  # the student's records hold activations: none outlive the step
                capture.recording = False
                capture.clear()
        weights = {
            "prediction": cfg.prediction_weight,
            "attention": cfg.attention_weight,
            "hidden": cfg.hidden_weight,
            "label": cfg.label_weight,
        }
        total = sum(weights[name] * value for name, value in parts.items())
        return {"loss": total} | parts

    def _hook(self, student: nn.Module, teacher: Teacher) -> tuple[_Capture, _Capture]:
        """Captures on `student` and the teacher's model: made at the first call, kept while both stay the same."""
        model = getattr(teacher, "model", None)
        if not isinstance(model, nn.Module):
            self.check_teacher(teacher)  # raises the RecipeError that names the loss fields
        if self._captures is None or self._captures[0] is not student or self._captures[1] is not model:
            if self._captures is not None:
                self._captures[2].remove()
                self._captures[3].remove()
            pairs = self.cfg.layer_pairs
            self._captures = (
                student,
                model,
                _Capture(student, [pair[0] for pair in pairs]),
                _Capture(model, [pair[1] for pair in pairs]),
            )
            blocks = transformer_blocks(student)
            self._pair_heads = [self._heads(blocks[name]) for name in self._captures[2].layers]
        return self._captures[2], self._captures[3]

    def _relation_losses(self, student: _Capture, teacher: _Capture) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean attention- and hidden-relation losses over the layer pairs, in float32 outside autocast.

        The teacher's records may be bfloat16 inference tensors (a live teacher runs under inference mode and,
        on CUDA, bf16 autocast); converting them gives plain float32 tensors the loss may keep for backward.
        """
        device_type = next(iter(student.tokens.values())).device.type
        attention, hidden = [], []
        with torch.autocast(device_type, enabled=False):
            for s, t, heads in zip(student.layers, teacher.layers, self._pair_heads, strict=True):
                if self.cfg.attention_weight > 0:
                    t_qkv = teacher.qkv[t].to(dtype=torch.float32, copy=True)
                    attention.append(attention_relation_loss(student.qkv[s].float(), t_qkv, heads))
                if self.cfg.hidden_weight > 0:
                    t_tokens = teacher.tokens[t].to(dtype=torch.float32, copy=True)
                    hidden.append(hidden_relation_loss(student.tokens[s].float(), t_tokens))
        zero = torch.zeros((), device=next(iter(student.tokens.values())).device)
        return (
            torch.stack(attention).mean() if attention else zero,
            torch.stack(hidden).mean() if hidden else zero,
        )


def _validate(cfg: MiniVitLoss) -> None:
    if cfg.temperature <= 0:
        raise RecipeError(f"loss.temperature: expected a number > 0, got {cfg.temperature}")
    for name in ("prediction_weight", "attention_weight", "hidden_weight", "label_weight"):
        if getattr(cfg, name) < 0:
            raise RecipeError(f"loss.{name}: expected a number >= 0, got {getattr(cfg, name)}")
    if not (cfg.prediction_weight or cfg.attention_weight or cfg.hidden_weight or cfg.label_weight):
        raise RecipeError("loss: every weight is 0, so there is nothing to train on")
    if cfg.relation_heads < 0:
        raise RecipeError(
            f"loss.relation_heads: expected an integer >= 0 (0: the student's heads), got {cfg.relation_heads}"
        )
    if (cfg.attention_weight or cfg.hidden_weight) and not cfg.layer_pairs:
        raise RecipeError("loss.layer_pairs: relation losses need at least one [student block, teacher block] pair")
    for i, pair in enumerate(cfg.layer_pairs):
        if len(pair) != 2:
            raise RecipeError(f"loss.layer_pairs[{i}]: expected [student block, teacher block], got {pair}")


# ---- the digits recipe's teacher ---------------------------------------------------------------------------


def tiny_deit_kwargs() -> dict[str, Any]:
    """A 32 px DeiT: 8 px patches (4 x 4 + 1 tokens), width 96, 6 blocks of 3 heads (0.69M params with 10 classes)."""
    return {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3}


def tiny_deit_teacher(num_classes: int = 10) -> nn.Module:
    """The digits recipe's teacher, `module:recipes.minivit:tiny_deit_teacher`: the model that
    `recipes/minivit_digits_teacher.yaml` trains (`deit_tiny_patch16_224` with `tiny_deit_kwargs()`)."""
    return timm.create_model("deit_tiny_patch16_224", num_classes=num_classes, **tiny_deit_kwargs())
