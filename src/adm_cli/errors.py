"""Typed errors. The library raises these; the CLI turns each into one line and an exit code."""

from __future__ import annotations


class AdmError(Exception):
    """Base class of every error adm-cli reports to a user (never a bug).

    Exit codes at the command line: 2 when the input is wrong (a flag's value, a model name, a
    respacing), 1 when the job failed on the way (network, files, memory, devices)."""

    exit_code = 1


class ConfigError(AdmError, ValueError):
    """An architecture or diffusion config that cannot describe a valid model."""


class ConfigInputError(ConfigError):
    """A config the user gave that is wrong as given: a misspelt flag, an unknown ``--arch`` name,
    a ``--config`` file that is not a readable table of flags."""

    exit_code = 2


class RespacingError(ConfigError):
    """A timestep-respacing string the reference would reject."""

    exit_code = 2


class UsageError(AdmError):
    """A bad command-line value (class, resolution, steps, ...)."""

    exit_code = 2


class RegistryError(AdmError):
    """A registry that cannot be read, or a malformed entry in it."""


class UnknownModelError(RegistryError):
    """A model name the registry does not hold, or a network the named entry lacks."""

    exit_code = 2


class DownloadError(AdmError):
    """A download that failed (network, HTTP status, size or checksum)."""


class OfflineError(DownloadError):
    """Network access was needed but forbidden (``--offline``) or unavailable."""


class ChecksumError(DownloadError):
    """Downloaded or cached bytes do not match the expected sha256 or size."""


class ConversionError(AdmError):
    """A checkpoint that cannot be converted to the canonical layout."""


class UnsafePickleError(ConversionError):
    """A pickle that asks for a global outside the allow-list (never executed)."""


class FileFormatError(ConversionError):
    """A weights file in none of the formats adm reads (an HTML page, a Git LFS pointer, an
    empty or cut-short file, ...), or in another than its name says (formats.py)."""


class WeightsError(AdmError):
    """Missing, unreadable or mismatched weights for a model."""


class OutputError(AdmError):
    """An output folder or file that cannot be written."""


class SamplingError(AdmError):
    """Sampling produced values that are no image (NaN or infinite)."""


class DeviceMemoryError(AdmError):
    """The device (or host) ran out of memory: the batch does not fit."""


class DistributedError(AdmError):
    """A multi-process run that failed in another rank or could not start."""


class KernelError(AdmError):
    """A fused GPU kernel (fused.py) failed to compile or launch on this machine."""


class GraphCaptureError(AdmError):
    """Capturing a sampling step as a CUDA graph (graphs.py) failed on this machine."""
