"""Errors of the load tester (separate from the client's tree: these are about the test, not a call).

::

    LoadTestError              base class
    ├── ConfigError            an impossible or malformed setting (also a ValueError)
    ├── DataError              the MNIST test files are missing or not what they claim to be
    ├── TargetUnreachableError a target did not answer the pre-flight call
    └── ResultFileError        a result file given to ``merge``/``compare`` cannot be used

Failed *calls* during a run are not exceptions: workers count them by kind (the client's
``MnistClientError.kind``: ``unavailable``, ``deadline_exceeded``, ``server_error``...).
"""

from __future__ import annotations


class LoadTestError(Exception):
    """Base class of every error the load tester raises."""


class ConfigError(LoadTestError, ValueError):
    """A setting is impossible or malformed; the message names it, what was got and what is expected."""


class DataError(LoadTestError):
    """The MNIST test files cannot be found or read."""


class TargetUnreachableError(LoadTestError):
    """A target did not answer the pre-flight prediction (down, wrong address, or not serving the model)."""


class ResultFileError(LoadTestError):
    """A result file is missing, not JSON, not a load-test result, or incompatible with the others."""
