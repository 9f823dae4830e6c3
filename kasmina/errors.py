"""Kasmina's exception hierarchy: every error the runtime raises derives from KasminaError."""


class KasminaError(Exception):
    """Base of the runtime's errors."""
