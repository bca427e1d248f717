"""Typed errors. The CLI maps each class to a one-line message and a distinct exit code (see README, "Exit codes").

User errors (bad input, bad recipe, unwritable output, ...) are subclasses of :class:`SparsecError`; anything else
that escapes is a bug and exits with :data:`EXIT_INTERNAL` (the traceback is shown only with ``--debug``).
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_THRESHOLD = 1  # a quality threshold (--max-error, batch thresholds) was exceeded
EXIT_USAGE = 2  # command-line usage error (unknown flag, missing argument) -- typer/click's own code
EXIT_INTERNAL = 70  # a bug in sparsec (EX_SOFTWARE)
EXIT_INTERRUPTED = 130  # SIGINT


class SparsecError(Exception):
    """Base class of every error a user can cause. ``exit_code`` is what the CLI exits with."""

    exit_code = 64
    label = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = " ".join(str(self.message).split())
        if self.hint:
            text += f" ({' '.join(self.hint.split())})"
        return f"{self.label}: {text}"


class ModelLoadError(SparsecError):
    """File not found, not a model, corrupt or truncated model file."""

    exit_code = 3
    label = "cannot load model"


class UnsupportedOpError(SparsecError):
    """An operator sparsec cannot import, execute or lower, in a position where it is required."""

    exit_code = 4
    label = "unsupported op"


class IRError(SparsecError):
    """An invalid graph: dangling values, cycles, shape or dtype mismatches. Names the node."""

    exit_code = 5
    label = "invalid graph"

    def __init__(self, message: str, *, node: str | None = None, hint: str | None = None):
        if node:
            message = f"node '{node}': {message}"
        super().__init__(message, hint=hint)
        self.node = node


class ShapeError(IRError):
    """Shapes or dtypes that do not agree (graph values, or user inputs against the graph's inputs)."""

    label = "shape mismatch"


class InputShapeError(ShapeError):
    """A user's input (``run`` / ``bench`` feeds) whose name, shape or dtype does not fit the model's inputs: bad input
    data (exit 8, like calibration data), not an invalid graph."""

    exit_code = 8
    label = "bad input data"


class RecipeError(SparsecError):
    """Invalid recipe: unknown keys, bad values, invalid pass combinations."""

    exit_code = 6
    label = "bad recipe"


class OutputError(SparsecError):
    """Output directory cannot be written (exists, not writable, disk full)."""

    exit_code = 7
    label = "cannot write output"


class CalibrationError(SparsecError):
    """Calibration or input data missing or not matching the model's inputs (names, shapes, dtypes)."""

    exit_code = 8
    label = "bad input data"


class NumericalError(SparsecError):
    """NaN or inf in weights, activations or statistics."""

    exit_code = 9
    label = "numerical error"


class PassError(SparsecError):
    """A pass's precondition or postcondition (its invariant) failed."""

    exit_code = 10
    label = "pass failed"


class BuildError(SparsecError):
    """Lowering, code generation or compilation for a target failed."""

    exit_code = 11
    label = "build failed"


class ToolMissingError(SparsecError):
    """An external tool (compiler, emulator, runtime) that the command needs is not installed."""

    exit_code = 12
    label = "missing tool"


class ArtifactError(SparsecError):
    """An artifact directory that is missing files, has a different schema version, or does not verify."""

    exit_code = 13
    label = "bad artifact"


ALL_ERRORS: tuple[type[SparsecError], ...] = (
    ModelLoadError,
    UnsupportedOpError,
    IRError,
    ShapeError,
    RecipeError,
    OutputError,
    CalibrationError,
    NumericalError,
    PassError,
    BuildError,
    ToolMissingError,
    ArtifactError,
)
