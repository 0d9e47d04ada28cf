"""Errors that the CLI turns into one clear line (no traceback)."""


class GlossRayError(Exception):
    """Bad input or configuration. The message names the file, row, column or option at fault."""


class DataError(GlossRayError, ValueError):
    """A corpus file is missing, unreadable or has bad rows/columns/labels."""


class ConfigError(GlossRayError, ValueError):
    """An option, config file or search space is invalid."""
