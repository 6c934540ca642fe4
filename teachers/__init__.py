"""Teachers: live models (timm, user modules, ensembles) and logit stores behind one interface.

teacher = create_teacher("timm:resnet50", num_classes=1000, checkpoint="resnet50.safetensors", device="cuda")
logits = teacher.logits(images)                    # [B, 1000] float32
store_teacher = create_teacher("store:teacher.zarr")
logits = store_teacher.logits(images, epoch, ids)  # the stored records, rebuilt at T = 1

CLIP teachers ("open_clip:NAME", or "store:PATH" of an embeddings store) give L2-normalised image and text
embeddings instead of logits: `EmbeddingTeacher` in teachers.clip_teacher.
"""

from .base import Teacher, TeacherError
from .checkpoint import file_sha256, load_checkpoint, load_state_dict_file, state_dict_sha256
from .clip_teacher import EmbeddingStoreTeacher, EmbeddingTeacher, OpenCLIPTeacher
from .ensemble import EnsembleTeacher
from .live import ModelTeacher
from .module_teacher import create_module_model
from .registry import create_teacher, list_teachers, register_teacher
from .store_teacher import StoreTeacher
from .timm_teacher import create_timm_model

__all__ = [
    "EmbeddingStoreTeacher",
    "EmbeddingTeacher",
    "EnsembleTeacher",
    "ModelTeacher",
    "OpenCLIPTeacher",
    "StoreTeacher",
    "Teacher",
    "TeacherError",
    "create_module_model",
    "create_teacher",
    "create_timm_model",
    "file_sha256",
    "list_teachers",
    "load_checkpoint",
    "load_state_dict_file",
    "register_teacher",
    "state_dict_sha256",
]
