"""Errors an operator sees: each carries one line that says what to fix."""


class XenblkError(Exception):
    """A user-facing error; the CLI prints `xenblk: <message>` and exits 1."""


class ConfigError(XenblkError):
    pass
