"""Errors that several layers raise, in a leaf module so that none of them imports another
for its exception class (config, validation and the run planner all raise ConfigError; the
flag registry raises FlagConfigError, which config re-raises as a ConfigError).

The CLI turns a ConfigError into a one-line message and exit code 2.
"""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


class FlagConfigError(ValueError):
    """A flag setting or combination that cannot work (re-raised by config as ConfigError)."""


__all__ = ["ConfigError", "FlagConfigError"]
