"""Errors flashmoe raises beyond ValueError / TypeError for bad input."""

from __future__ import annotations


class FlashMoEError(RuntimeError):
    """The GPU kernel stopped before finishing: a bounded wait expired (a peer or a block never
    signalled) or the launch failed. ``records`` holds what every hosted rank was waiting for,
    decoded from the kernel's error buffer (see ``flashmoe.host.launch``)."""

    def __init__(self, message: str, records: list | None = None):
        super().__init__(message)
        self.records = list(records or [])


class KernelUnavailable(RuntimeError):
    """backend='kernel' was asked for but the kernel cannot run here; the message says why."""
