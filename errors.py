"""The errors a user can cause, and the one base class every entry point catches.

A :class:`UserError` is a problem with what was given (configuration, data, model, checkpoint, patch, edit
request) or with the run's environment (a checkpoint that cannot be written), never a bug. Its message is one
line that names the key, file or line at fault and says what to do; ``python -m run``, ``python -m edit`` and
``python -m scripts.train_fc_classifier`` log it and exit with status 2, without a traceback.

This module imports nothing, so any other module may import it.
"""


class UserError(Exception):
    """Base class of every error that is reported as one line and exit status 2."""


class ConfigError(UserError, ValueError):
    """A configuration key has a value that cannot work; the message names the key."""


class DataError(UserError, ValueError, RuntimeError):
    """An edit data set cannot be read or built; the message names the file (and line) or the data key."""


class ModelLoadError(UserError, RuntimeError):
    """A base model or tokenizer cannot be loaded; the message names the model and says how to run offline."""


class InnerParamsError(UserError, ValueError):
    """``model.inner_params`` names weights the model does not have or that an editor cannot edit."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used: missing, unreadable, or made for another model or setting."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, permissions); the previous one is intact."""


class NonFiniteLossError(UserError, RuntimeError):
    """Too many consecutive training steps had non-finite losses or gradients."""


class EditRequestError(UserError, ValueError):
    """An edit request (or a file of them) is malformed; the message names the file and the entry."""


class PatchError(UserError, ValueError):
    """A patch cannot be read, or does not fit the base model it is applied to."""


class HubError(UserError, RuntimeError):
    """The HuggingFace hub cannot be used for a download or an upload (offline, no token, no such repository)."""


class OutputExistsError(UserError, FileExistsError):
    """An output directory exists and is not empty (or is not a directory), and overwriting was not asked for."""


class OutputPathError(UserError, FileNotFoundError):
    """An output's directory does not exist or cannot be written to, or a file was asked for where a directory is."""


class DeviceError(UserError, RuntimeError):
    """The device asked for is not on this machine (CUDA without a GPU, a GPU index beyond the count) or unknown."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; a last checkpoint was written when saving is on. Not a user error:
    the entry point exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
