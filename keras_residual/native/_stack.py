"""Whether the caller runs inside given library code, from the Python stack."""

from __future__ import annotations

import sys


def called_from(*folders: str) -> bool:
    """Whether a frame on the caller's stack runs a file under one of `folders`.

    Args:
        folders: path fragments with forward slashes, such as
            ``"/keras/src/export/"``.

    Returns:
        True if the file of any calling frame contains one of them.

    Examples:

    >>> called_from("/no/such/folder/")
    False
    """
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename.replace("\\", "/")
        if any(folder in filename for folder in folders):
            return True
        frame = frame.f_back
    return False
