"""Errors that fedsim reports to users as one line."""

from __future__ import annotations


class FedsimError(Exception):
    """A user-facing error: the command-line entry prints ``str(err)`` and exits 2."""


class ConfigError(FedsimError, ValueError):
    """A configuration value is not allowed.

    The message names the option, the value given and what is allowed, e.g.
    ``clients_per_round=500: allowed is an integer in [1, clients=100]``.
    """

    def __init__(self, option: str, allowed: str, value: object = None) -> None:
        self.option = option
        self.allowed = allowed
        self.value = value
        super().__init__(f"{option}={value}: allowed is {allowed}")


class DataError(FedsimError):
    """Data that cannot be read: a missing, malformed or too small file or dataset."""
