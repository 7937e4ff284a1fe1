"""Numba CPU kernels, one module per family (``pyopt._numba.optim``, ...).

Importing this package never needs numba: the kernel modules import it and are
loaded only when a numba backend is actually used. ``available()`` says whether
that can work, and why not.
"""

from __future__ import annotations

import functools

__all__ = ["available"]


@functools.lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """(True, "") when the numba backend can run, else (False, reason)."""
    try:
        import numba  # noqa: F401
    except ImportError as e:
        if e.name == "numba":
            return False, "numba is not installed (pip install numba)"
        return False, f"numba failed to import: {e}"
    except Exception as e:  # a broken install can raise anything (e.g. numpy ABI errors)
        return False, f"numba failed to import: {type(e).__name__}: {e}"
    return True, ""
