"""Errors that the command line reports as one clear line (no traceback)."""


class XdpoError(Exception):
    """Base class: the message is shown to the user as is."""


class ConfigError(XdpoError, ValueError):
    """A config key is unknown, has the wrong type, or an impossible value."""


class DataError(XdpoError, ValueError):
    """A data file, column or row is missing or malformed."""
