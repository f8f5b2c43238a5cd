"""The one exception type raised for bad data (files, index lines, label values)."""


class DatasetError(ValueError):
    """A sample, file or index line is unusable; the message names the file (and line)."""
