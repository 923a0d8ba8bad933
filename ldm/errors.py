"""Errors the user can fix: every command-line door turns these into a message and exit code 2."""


class LdmError(Exception):
    """A problem with the user's input (file, argument, config) and how to fix it."""

    exit_code = 2


class CheckpointError(LdmError):
    """A checkpoint is missing, unreadable, unsafe to load, or does not fit the model config."""


class ConfigError(LdmError):
    """A config file or override is malformed or names an unknown key."""
