"""Errors a user can fix. The CLI prints them as one line and exits 2."""


class UserError(Exception):
    """Bad input: a file, a config key, a value, a name. The message names it."""

    exit_code = 2


class DataError(UserError):
    """A dataset file is missing, truncated, corrupt or inconsistent."""


class ConfigError(UserError):
    """A config file, key or value is wrong."""
