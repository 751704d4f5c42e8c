"""A restricted unpickler for the CIFAR python batches.

``pickle.load`` on a downloaded file runs whatever callable the file names, so a tampered archive
could run code. The CIFAR batches only hold dicts, lists, ints, bytes and numpy uint8 arrays;
rebuilding the arrays needs exactly three numpy globals, so those are the only globals this
unpickler will resolve.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

from jemlab.errors import DataError

# (module, name) pairs a numpy ndarray pickle refers to. NumPy 2 renamed numpy.core to numpy._core,
# and files pickled under either spelling must load under both, so both are listed.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except the numpy constructors in ``ALLOWED_GLOBALS``.

    Args:
        file: binary file object to read from.
        source: file name used in error messages.
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, source: str) -> None:
        # encoding="bytes": the official batches were written by Python 2, whose str must stay bytes
        # (the pixel buffer is one); dict keys therefore come back as b"data", b"labels".
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise DataError(
                f"{self.source}: refusing to unpickle: it references {module}.{name}, which a "
                f"CIFAR batch never does (the file may be tampered with); delete it and "
                f"re-download, or pass --data-dir to the official files"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        import numpy

        return getattr(numpy, name)


def _numpy_reconstruct() -> Any:
    """numpy's ndarray reconstructor under whichever module name this numpy version uses."""
    try:  # NumPy >= 2; importing numpy.core there emits a DeprecationWarning
        from numpy._core.multiarray import _reconstruct  # type: ignore[import-not-found]
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def safe_loads(data: bytes, source: str | os.PathLike) -> Any:
    """Unpickle ``data`` with ``RestrictedUnpickler``.

    Args:
        data: the pickle bytes.
        source: file name for error messages.

    Returns:
        The unpickled object.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), str(source)).load()
    except DataError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, ... from a damaged file
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(
            f"{source}: not a readable pickle ({reason}); delete it and re-download, or pass --data-dir to a good copy"
        ) from exc
