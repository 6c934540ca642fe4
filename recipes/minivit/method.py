"""The MiniViT method: hooks on the student and the live teacher, and the loss they feed (see `recipes.minivit`).

Before training, `check_teacher` refuses a teacher without a model and `build_student` (given the checked teacher)
resolves the layer pairs (the recipe's, or the reference's for the two models) and checks them, the relation heads and (with one zero image
through both models) token counts, each error naming its `loss.` field.
Hooks are put on the (unwrapped) student and the teacher's model at the first `loss` call and kept; they record
only inside `loss` and their records are dropped at its end, so evaluation forwards record nothing and no
activations outlive a step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import RecipeError
from distill.losses import label_loss, soft_target_cross_entropy
from distill.method import Method
from distill.recipe import StudentConfig
from teachers import Teacher

from .relations import (
    RelationCapture,
    attention_relation_loss,
    hidden_relation_loss,
    reference_layer_pairs,
    transformer_blocks,
)

__all__ = ["MiniVit", "deit_kl_prediction", "soft_ce_prediction"]


def soft_ce_prediction(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mini-Swin's prediction term: the batch mean of CE(softmax(teacher / T), log_softmax(student / T)), no T^2.

    Teacher logits may be log-probabilities (a store's rebuild): their softmax is the stored distribution.
    """
    targets = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return soft_target_cross_entropy(student_logits / temperature, targets)


def deit_kl_prediction(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mini-DeiT's prediction term, DeiT's soft distillation: KL(teacher / T || student / T) summed over batch and
    classes, times T^2, over the logits' element count (batch x classes): 1 / classes of the batch-mean KL."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, reduction="sum", log_target=True)
    return kl * temperature**2 / student_logits.numel()


PREDICTION = {"soft_ce": soft_ce_prediction, "deit_kl": deit_kl_prediction}


class _Capture(RelationCapture):
    """A RelationCapture that records only while `recording` is set (the trainer's evaluation forwards don't)."""

    recording = False

    def _store_qkv(self, name: str, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.recording:
            super()._store_qkv(name, module, args, output)

    def _store_tokens(self, name: str, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.recording:
            super()._store_tokens(name, module, args, output)


class MiniVit(Method):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._captures: tuple[nn.Module, nn.Module, _Capture, _Capture] | None = None
        self._pairs: list[list[int]] | None = self.cfg.layer_pairs or None  # resolved once both models are known

    @property
    def uses_relations(self) -> bool:
        return self.cfg.uses_relations

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
        model = teacher.model
        if not isinstance(model, nn.Module):
            raise RecipeError(
                f"{self._relation_fields()}, but relation losses need a live teacher model and teacher "
                f"{teacher.spec} has none (a logit store holds only logits; an ensemble has several models). "
                "Set loss.attention_weight and loss.hidden_weight to 0 to train from it (prediction term only), "
                "or use a live transformer teacher"
            )
        self._check_layers(model, 1, "teacher")  # explicit pairs only: the reference's need the student too

    def build_student(self, cfg: StudentConfig, img_size: int, teacher: Teacher | None) -> nn.Module:
        """The student, checked against the teacher's model (relation terms): layer pairs, heads, token counts."""
        model = super().build_student(cfg, img_size, teacher)
        if self.uses_relations:
            self._check_layers(model, 0, "student")  # a transformer, holding the recipe's paired blocks
            live = teacher.model if teacher is not None else None  # (check_teacher refused a teacher without)
            if live is not None:
                self._resolve_pairs(model, live)
                self._check_heads(self._check_layers(model, 0, "student"), self._check_layers(live, 1, "teacher"))
                self._check_tokens(model, live, img_size)
        return model

    def _resolve_pairs(self, student: nn.Module, teacher: nn.Module) -> list[list[int]]:
        """The layer pairs: the recipe's, or the reference's for these two models (`loss.layer_pairs: []`)."""
        if self._pairs is None:
            try:
                self._pairs = reference_layer_pairs(student, teacher)
            except (TypeError, ValueError) as err:
                raise RecipeError(f"loss.layer_pairs is empty (the reference's pairs): {err}; set it") from None
        return self._pairs

    def _check_tokens(self, student: nn.Module, teacher: nn.Module, img_size: int) -> None:
        """One zero image through both models: paired layers must have equal token counts (e.g. not a DeiT
        student against a distilled DeiT teacher with its extra token, or Swin layers of other window layouts)."""
        pairs = self._resolve_pairs(student, teacher)
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
        """The paired blocks of `model` (side 0: student, 1: teacher), none while the pairs are not resolved; a
        RecipeError if `model` has no transformer blocks or a paired block does not exist."""
        try:
            blocks = list(transformer_blocks(model).values())
        except TypeError as err:
            raise RecipeError(f"{self._relation_fields()}: relation losses need a transformer {what} ({err})") from None
        for i, pair in enumerate(self._pairs or []):
            if not -len(blocks) <= pair[side] < len(blocks):
                raise RecipeError(
                    f"loss.layer_pairs[{i}][{side}]: {what} block {pair[side]} does not exist "
                    f"(the {what} has {len(blocks)} transformer blocks)"
                )
        return [blocks[pair[side]] for pair in self._pairs or []]

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
                parts["prediction"] = PREDICTION[cfg.prediction_form](logits, teacher_logits, cfg.temperature)
            if captures:
                attention, hidden = self._relation_losses(*captures)
                if cfg.attention_weight > 0:
                    parts["attention"] = attention
                if cfg.hidden_weight > 0:
                    parts["hidden"] = hidden
            if cfg.label_weight > 0:
                parts["label"] = label_loss(logits, batch, self.num_classes)  # the labelled images only
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
        model = teacher.model
        if not isinstance(model, nn.Module):
            self.check_teacher(teacher)  # raises the RecipeError that names the loss fields
        if self._captures is None or self._captures[0] is not student or self._captures[1] is not model:
            if self._captures is not None:
                self._captures[2].remove()
                self._captures[3].remove()
            pairs = self._resolve_pairs(student, model)
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
