"""The one exception type of configuration problems."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or override that cannot become a valid typed config.

    The message always names where the problem is (the file, or the override token) and the
    full dotted key, so that the CLI can print it as one line.
    """
