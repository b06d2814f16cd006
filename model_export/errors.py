"""Failures the exporter reports as one clear line and a non-zero exit status."""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_VERIFICATION_FAILED = 3


class ExportError(Exception):
    """Bad input or environment: a missing file, mismatched weights, an unwritable path."""

    exit_code = EXIT_BAD_INPUT


class VerificationFailed(ExportError):
    """The exported graph does not reproduce its reference within tolerance."""

    exit_code = EXIT_VERIFICATION_FAILED
