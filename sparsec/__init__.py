"""sparsec: an ahead-of-time model compression compiler.

The distribution maps the repository's top-level folders (compressor/, passes/, calibration/, backends/, cli/,
golden/) into this namespace. When the package is imported from a source checkout rather than an installed copy,
the same mapping is made here so that ``python -m sparsec`` works from the repository root.
"""
from __future__ import annotations

import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "compressor")):
    # source checkout: sparsec.compressor -> <root>/compressor, etc.
    __path__.append(_root)  # type: ignore[name-defined]
