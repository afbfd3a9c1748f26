"""The one error hierarchy of deltackpt.

Every error the library raises on purpose is a :class:`DeltackptError`. Where a
builtin exception fits, the subclass also inherits it, so ``except KeyError``
keeps working for code that does not know deltackpt. The CLI maps each class to
an exit code in :data:`EXIT_CODES`, in this one place.
"""

from __future__ import annotations


class DeltackptError(Exception):
    """Base class of every error deltackpt raises on purpose."""


class StepNotFoundError(DeltackptError, KeyError):
    """The requested step is not committed in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "step not found"


class StepExistsError(DeltackptError, ValueError):
    """Saving a step number that is already committed."""


class UnsupportedValueError(DeltackptError, TypeError):
    """A value in the state cannot be stored without pickle; names its path."""


class CorruptionError(DeltackptError, OSError):
    """Stored bytes do not match what the index says; names step, entry and block."""


class StoreLockedError(DeltackptError, BlockingIOError):
    """Another process holds the writer lock of the store."""


class StorageError(DeltackptError, OSError):
    """Writing to or reading from the store failed (disk full, I/O error, failed fsync);
    names the store and the operation. Nothing the failed call was making becomes visible."""

    @classmethod
    def caused_by(cls, message: str, cause: BaseException) -> StorageError:
        """A StorageError saying ``message`` that keeps ``cause``'s errno, when it has one
        (raise it ``from cause``)."""
        code = getattr(cause, "errno", None)
        return cls(code, message) if code else cls(message)


class FormatVersionError(DeltackptError, ValueError):
    """The store or object was written by a newer (or unknown) format version."""


class InvalidStoreError(DeltackptError, ValueError):
    """The path is not a deltackpt store, or a request names something outside it."""


class StoreClosedError(DeltackptError, ValueError):
    """The store (or checkpointer) was used after close()."""


class BackgroundSaveError(DeltackptError, RuntimeError):
    """A background (async) save failed; raised at the next call on the checkpointer."""


class InvalidInputError(DeltackptError, ValueError):
    """An input cannot be used as asked: a malformed file to import, steps whose entries
    cannot be averaged together, an unwritable export; names the file, step or path."""


class CheckpointDirError(DeltackptError, ValueError):
    """A framework checkpoint directory cannot be ingested or materialized (deltackpt.hf)."""


#: CLI exit codes, one per error class; the most specific class wins.
EXIT_CODES: dict[type[BaseException], int] = {
    StepNotFoundError: 3,
    StepExistsError: 4,
    UnsupportedValueError: 5,
    CorruptionError: 6,
    StoreLockedError: 7,
    FormatVersionError: 8,
    InvalidStoreError: 9,
    StoreClosedError: 10,
    BackgroundSaveError: 11,
    DeltackptError: 2,
}


def exit_code_for(exc: BaseException) -> int:
    """Return the CLI exit code for ``exc`` (2 for any other deltackpt error)."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1
