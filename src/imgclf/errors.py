"""Errors a user can fix. Entry points print them as one line and exit non-zero."""


class PipelineError(Exception):
    """A problem with the user's input or environment, stated so they can fix it."""


class ConfigError(PipelineError):
    """params.yaml (or a value given with `dvc exp run -S`) is not valid."""


class DataError(PipelineError):
    """A data file is missing, corrupt, or does not match what the stage expects."""


class DownloadError(DataError):
    """No mirror delivered a verified copy of a file."""


class TrainingError(PipelineError):
    """Training diverged or cannot continue."""


class TrackingError(PipelineError):
    """The MLflow tracking server cannot be used."""
