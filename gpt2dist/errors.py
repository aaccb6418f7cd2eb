"""User-facing errors: one line that names the culprit and the fix.

The CLI catches `GPT2DistError` and prints only its message (no traceback), so raise it
for every problem that a user can fix in their data, config or environment.
"""


class GPT2DistError(Exception):
    """A problem in the user's input. The message names the culprit and the fix."""


class DataError(GPT2DistError):
    """Bad corpus: missing, empty, binary, non-UTF-8 or malformed files."""


class ConfigError(GPT2DistError):
    """An inconsistent configuration (e.g. block_size above n_positions)."""


class CheckpointError(GPT2DistError):
    """A missing, truncated or incompatible checkpoint."""
