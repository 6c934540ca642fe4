"""The engine's input errors, under the toolkit's one root `DistillError` (see `logit_store.errors`).

The command-line tools catch exactly `DistillError`: one line naming the file, key or field at
fault and exit code 2. Any other exception is a bug and keeps its traceback.
"""

from logit_store.errors import DistillError

__all__ = ["DatasetError", "DistillError", "RecipeError"]


class RecipeError(DistillError):
    """A recipe that cannot run; the message names the file and the key path at fault."""


class DatasetError(DistillError):
    """A dataset spec, file or sample that cannot be used; the message names it."""
