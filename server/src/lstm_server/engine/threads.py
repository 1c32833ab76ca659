"""The model threads' names, for the operating system too."""

from __future__ import annotations

import ctypes
import sys

PR_SET_NAME = 15  # prctl(2)
MAX_NAME_BYTES = 15  # the kernel keeps 16 bytes with the terminating NUL


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` (its first 15 bytes) where the operating system shows it: ``top -H``,
    ``/proc/<pid>/task/<tid>/comm``. Python 3.11 names threads for Python only. Linux only; elsewhere nothing."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:MAX_NAME_BYTES], 0, 0, 0)
