"""Other libraries' own output (img2dataset's prints and tracebacks, open_clip's, transformers' and
webdataset's log records and warnings) goes to a log file beside the build or the run, not to
the terminal, where it would break up the progress bars and bury cnclip's own lines.

Two levels, for two kinds of process:
- `output_to(path)`: file descriptors 1 and 2 themselves, for a worker process that only runs a
  library (a download lane): prints, tqdm bars, C extensions' writes and logging's last-resort
  handler all land in the file.
- `library_log(path)`: Python's logging and warnings, for a process that also prints cnclip's own
  lines (training): records of the root logger (open_clip logs there) and of transformers'
  logger, and `warnings.warn` messages, at WARNING and above.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

# open_clip says this after building any model that it loaded no weights into, also when a
# checkpoint's weights are loaded right after: there it is false, and it is dropped.
RANDOM_INIT = "No pretrained weights loaded for model"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def output_to(path: Optional[str | Path], header: str = "") -> Iterator[None]:
    """This process's stdout and stderr (the descriptors, so C code and threads too) appended to
    `path` while the block runs, then restored; None: left as they are."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(1), os.dup(2)
    try:
        if header:
            os.write(target, f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {header}\n".encode())
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):  # a closed stream: nothing buffered to keep
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (target, *saved):
            os.close(fd)


class _DropRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(RANDOM_INIT)


@contextlib.contextmanager
def weights_loaded_after() -> Iterator[None]:
    """Around building a model whose weights are loaded next (a checkpoint, init.clip): open_clip's
    'initialized randomly' warning is not said at all."""
    root, dropper = logging.getLogger(), _DropRandomInit()
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


def _transformers_logging():
    """transformers' logging module, when transformers is installed (it logs to its own handler
    on stderr, not through the root logger)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return None
    return hf_logging


@contextlib.contextmanager
def library_log(path: str | Path) -> Iterator[None]:
    """Log records of the root logger and transformers', and Python warnings, appended to `path`
    instead of stderr while the block runs."""
    handler = logging.FileHandler(path, encoding="utf-8", delay=True)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    hf = _transformers_logging()
    root.addHandler(handler)
    logging.captureWarnings(True)
    if hf is not None:
        hf.disable_default_handler()
        hf.enable_propagation()
    try:
        yield
    finally:
        if hf is not None:
            hf.disable_propagation()
            hf.enable_default_handler()
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()
