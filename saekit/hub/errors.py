"""The errors of the pretrained-dictionary layer: each message says what is wrong and what to do."""

from __future__ import annotations


class HubError(Exception):
    """A pretrained dictionary could not be found, read, converted or published."""


class FormatError(HubError, ValueError):
    """A dictionary's config or weights are malformed or inconsistent (a truncated file, a wrong
    ``d_in``), or describe an architecture that saekit cannot represent exactly."""


class UnsafeInputError(HubError, ValueError):
    """Refused for safety before anything was used: a pickle without the per-call opt-in, a name that
    leaves its folder, a file far larger than its config implies."""


class NotAvailableError(HubError, FileNotFoundError):
    """The Hub or the local cache cannot provide the repository, revision or file asked for."""
