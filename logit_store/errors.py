"""Errors raised by the logit store; each message names the store, field or range at fault."""


class StoreError(Exception):
    """Base class of every logit-store error."""


class StoreInputError(StoreError, ValueError):
    """Records or arguments that do not fit the store (shape, dtype, range, NaN)."""


class ManifestMismatchError(StoreError):
    """An existing store was opened with a manifest that differs from the one asked for."""


class StoreLockedError(StoreError):
    """Another process is writing the same (epoch, record range)."""


class NotCommittedError(StoreError, KeyError):
    """A read asked for records whose range has not been committed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
