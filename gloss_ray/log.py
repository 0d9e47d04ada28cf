"""gloss-ray's one way of telling the user something: a line ``[gloss-ray] MSG``, flushed, with the
credentials of every URI in it redacted (:func:`gloss_ray.storage.redact`).

* :func:`say`: on stdout -- a run's and a sweep's progress -- or on the ``file`` given: stderr for the
  notes of a command whose stdout is its result (``gloss-ray data download``, ``predict``);
* :func:`for_rank`: ``say`` for one rank of a Train run: rank 0 says, the other ranks say nothing;
* :func:`fail`: a failing command's last line, ``gloss-ray: MSG`` on stderr (the format of argparse's
  own usage errors).

Progress bars are tqdm's; the quieted loggers of other libraries are :func:`gloss_ray.train.session.quiet_libraries`.
"""
from __future__ import annotations

import sys
from typing import Callable

from .storage import redact

PREFIX = "[gloss-ray]"


def say(msg: str, file=None) -> None:
    """Print ``[gloss-ray] MSG`` (credentials redacted) to ``file``, default stdout, and flush it."""
    print(redact(f"{PREFIX} {msg}"), file=file, flush=True)


def for_rank(rank: int) -> Callable[[str], None]:
    """``log(msg)`` for rank ``rank`` of a Train run: :func:`say` to the process's own stdout
    (``sys.__stdout__``: Ray Train V2 patches print() to tee ``sys.stdout`` into its logger, which
    doubled every line) on rank 0; nothing on the other ranks."""
    if rank != 0:
        return lambda msg: None
    return lambda msg: say(msg, file=sys.__stdout__)


def fail(msg: str) -> None:
    """Print ``gloss-ray: MSG`` (credentials redacted) to stderr: the last line of a failed or
    interrupted command."""
    print(redact(f"gloss-ray: {msg}"), file=sys.stderr, flush=True)
