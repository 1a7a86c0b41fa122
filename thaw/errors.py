"""The one exception type for problems a user can fix (bad data, bad settings)."""


class ThawError(Exception):
    """Bad input or configuration. The message is written for the person running thaw:
    it names the problem and, where possible, the fix. The CLI prints it and exits 2."""
