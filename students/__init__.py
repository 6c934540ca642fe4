"""Student models. Importing the package registers its timm models: the MiniViT configurations
(`timm.create_model("mini_deit_small_patch16_224")`), Cream's supernet (`cream_supernet`) and its
exported paths (`cream_path`). `import students.tinyclip` registers the TinyCLIP configurations with
open_clip (`open_clip.create_model("TinyCLIP-ViT-8M-16-Text-3M")`), and `students.clip_pruned`
builds pruned CLIP models."""

from . import minivit, supernet

__all__ = ["minivit", "supernet"]
