"""Teachers behind one interface (`Teacher`): logits or CLIP embeddings, from a live model or a store.

teacher = create_teacher("timm:resnet50", num_classes=1000, checkpoint="resnet50.safetensors", device="cuda")
logits = teacher.logits(images)                    # [B, 1000] float32
store_teacher = create_teacher("store:teacher.zarr")
logits = store_teacher.logits(images, epoch, ids)  # the stored records, rebuilt at T = 1
clip = create_teacher("open_clip:ViT-B-32", checkpoint="clip.safetensors")
clip.image_embeddings(images), clip.text_embeddings(tokens)   # L2-normalised

Builders are found by spec prefix in `TEACHERS` and imported on first use (open_clip only for
"open_clip:" teachers).
"""

from .base import Teacher, TeacherError
from .registry import TEACHERS, create_teacher

__all__ = ["TEACHERS", "Teacher", "TeacherError", "create_teacher"]
