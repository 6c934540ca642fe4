"""The toolkit's one error root, and the errors of the logit store.

`DistillError` is the root of every error that is the input's fault: a recipe, a dataset,
a teacher spec, a checkpoint file or a store that cannot be used. Every package derives its
errors from it, and the command-line tools catch exactly it: an input error is one line and
exit code 2, anything else (a bug) is a traceback. It lives here because the store is the
package every other one imports and that imports none of them.
"""


class DistillError(ValueError):
    """Input that cannot be used; the message names the file, key, field or range at fault."""


class StoreError(DistillError):
    """Base class of every logit-store error."""


class StoreInputError(StoreError):
    """Records or arguments that do not fit the store (shape, dtype, range, NaN)."""


class ManifestMismatchError(StoreError):
    """An existing store was opened with a manifest that differs from the one asked for."""


class StoreLockedError(StoreError):
    """Another process is writing the same (epoch, record range)."""


class NotCommittedError(StoreError, KeyError):
    """A read asked for records whose range has not been committed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
