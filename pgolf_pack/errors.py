"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""


class PgolfError(Exception):
    """An error caused by the user's input or environment (bad file, missing binary, budget...)."""


class ArtifactError(PgolfError):
    """The artifact is truncated, corrupted or of an unknown format."""
