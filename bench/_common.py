"""Helpers shared by the benchmark scripts (run as ``python bench/<script>.py``, so this folder is on sys.path)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def subprocess_env(threads: int) -> dict:
    """The environment for a timed ``python -m sparsec`` child: the checkout first on PYTHONPATH, BLAS/OpenMP pools
    at ``threads``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    return env


def write_results(stem: str, doc: dict, md: list[str]) -> None:
    """``bench/results/<stem>.json`` (``doc``) and ``<stem>.md`` (the table's lines), and the table on stdout."""
    import json

    out = ROOT / "bench" / "results"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
