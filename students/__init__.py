"""Student models. Importing the package registers them: with timm, the MiniViT configurations
(`timm.create_model("mini_deit_small_patch16_224")`), Cream's supernet (`cream_supernet`) and its exported
paths (`cream_path`); with open_clip, the TinyCLIP configurations
(`open_clip.create_model("TinyCLIP-ViT-39M-16-Text-19M")`: configurations only, no weights are fetched).
`students.clip_pruned` builds pruned CLIP models."""

from . import minivit, supernet, tinyclip

__all__ = ["minivit", "supernet", "tinyclip"]
