"""The errors that reach the user as one line (the command line catches these), kept free of heavy imports so that
the command line can name them without loading torch. Each is re-exported by the module that raises it."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which file and why."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says where and what was kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (save, then exit). A subclass on purpose: CPython kills itself with SIGINT at
    exit when a *plain* KeyboardInterrupt passed through certain C-level frames, even if it was caught later."""


class ExportError(RuntimeError):
    """A model cannot be exported (or the export does not match the model); the message says why."""
