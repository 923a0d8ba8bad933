"""Errors the user can fix: every command-line door turns these into a message and exit code 2."""


class LdmError(Exception):
    """A problem with the user's input (file, argument, config) and how to fix it."""

    exit_code = 2


class CheckpointError(LdmError):
    """A checkpoint is missing, unreadable, unsafe to load, or does not fit the model config."""


class ConfigError(LdmError):
    """A config file or override is malformed or names an unknown key."""


# errno values of a write the user can fix: no space, quota exceeded, read-only file system, permission denied
_WRITE_ERRNOS = {28: "no space left on device", 122: "disk quota exceeded", 30: "read-only file system",
                 13: "permission denied"}
# torch.save's zip writer reports a short write as a RuntimeError with one of these, without the errno
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")


def write_failure(e: BaseException) -> str | None:
    """What went wrong when `e` is a failed file write the user can fix (a full disk, a quota, a read-only or
    forbidden folder), else None. Besides an OSError with that errno, safetensors reports it as a SafetensorError
    ('I/O error: No space left on device (os error 28)') and torch.save as a RuntimeError from its zip writer."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return _WRITE_ERRNOS[e.errno]
    text = str(e)
    if type(e).__name__ == "SafetensorError":
        for errno, reason in _WRITE_ERRNOS.items():
            if f"(os error {errno})" in text:
                return reason
    if isinstance(e, RuntimeError) and any(s in text for s in _SHORT_WRITE):
        return "a file was written short (is the disk full?)"
    return None
