"""Errors raised by the Wan converters. Each names the file, key or directory at fault."""

from __future__ import annotations


class ConversionError(ValueError):
    """Base class: the input or output of a conversion is not what it must be."""


class UnknownLayoutError(ConversionError):
    """No Wan2.1 layout (original or diffusers) recognized in the source."""


class KeyMismatchError(ConversionError):
    """Keys missing from, or unexpected in, a checkpoint (both lists are in the message)."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str]):
        self.missing, self.unexpected = list(missing), list(unexpected)
        lines = [f"{what}: {len(self.missing)} missing key(s), {len(self.unexpected)} unexpected key(s)"]
        if self.missing:
            lines.append("missing: " + ", ".join(self.missing))
        if self.unexpected:
            lines.append("unexpected: " + ", ".join(self.unexpected))
        super().__init__("\n".join(lines))


class ShapeMismatchError(ConversionError):
    """Tensors whose shape differs from the one the model config implies: (key, found, expected)."""

    def __init__(self, what: str, mismatches: list[tuple[str, tuple, tuple]]):
        self.mismatches = list(mismatches)
        lines = [f"{what}: {len(self.mismatches)} tensor(s) with the wrong shape"]
        lines += [
            f"{key}: found {tuple(found)}, expected {tuple(exp)}" for key, found, exp in self.mismatches
        ]
        super().__init__("\n".join(lines))


class CorruptFileError(ConversionError):
    """A weight file that cannot be read as what its name says (truncated, bad header, bad index)."""


class OutputExistsError(ConversionError):
    """The output directory already holds a checkpoint or other files (pass --overwrite to replace)."""


class VerificationError(ConversionError):
    """``--verify``: the converted model's output differs from the source's beyond the tolerance, or is not
    finite (the CLI exits with status 3)."""
