"""The one exception type for user mistakes: the CLI prints it on one line and exits 2."""


class IlladaError(Exception):
    """A problem with the user's input (path, checkpoint, option), not a bug in illada."""
