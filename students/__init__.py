"""Student builders. Importing the package registers its models: the MiniViT configurations
with timm (`timm.create_model("mini_deit_small_patch16_224")`) and the TinyCLIP ones with
open_clip (`open_clip.create_model("TinyCLIP-ViT-8M-16-Text-3M")`), and Cream's
exported paths as the timm model `cream_path`."""

from . import minivit, supernet, tinyclip

__all__ = ["minivit", "supernet", "tinyclip"]
