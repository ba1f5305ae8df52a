"""The error raised when calibration data cannot produce a trustworthy guard."""

from __future__ import annotations

from ..bundle import BundleError


class CalibrationError(BundleError):
    """Calibration cannot produce a trustworthy guard from the given data."""
