"""The one error type users see: a bad input, reported as one line that says what and how to fix."""


class OnestepError(ValueError):
    """Bad input (configuration, teacher, run folder); the trainer prints it as one line and exits 2."""


class NonFiniteError(OnestepError):
    """Training stopped: too many consecutive updates had a non-finite loss or gradient."""
