"""How a ``writesae`` command runs: clean stops on Ctrl-C or SIGTERM, errors without tracebacks.

A long command checkpoints as it goes (each command's module says where and how often). When it is
stopped, by Ctrl-C (SIGINT) or by SIGTERM (a job scheduler, ``kill``), the work in progress is
abandoned, the last checkpoint stays on disk, and `run_command` prints the exact command that
continues it: the same arguments with ``--resume`` in place of ``--overwrite``.

Errors a user can fix (a missing file, a bad value, a diverged run) print one line naming the
problem and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from writesae.outputs import holds_files

__all__ = ["Stopped", "stop_signals", "resume_command", "run_command", "user_errors"]


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal (SIGTERM); Ctrl-C raises the KeyboardInterrupt it derives from."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or a bad state the user can fix (printed as one line)."""
    from writesae.trainer import TrainingError

    return (OSError, KeyError, ValueError, TrainingError)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Turn SIGTERM into `Stopped` inside the block (Ctrl-C already raises KeyboardInterrupt)."""

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resume_command(argv: list[str], resume: bool = True) -> str:
    """The command line that continues a run started with ``argv`` (``--resume``, no ``--overwrite``),
    or with ``resume=False`` the one that starts it again (neither flag)."""
    kept = [a for a in argv if a not in ("--overwrite", "--resume")]
    return shlex.join(["writesae", *kept, *(["--resume"] if resume else [])])


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def run_command(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the parsed subcommand; returns the process exit status.

    0: done; 2: an error the user can fix (one line on stderr); 130 (Ctrl-C) or 143 (SIGTERM):
    stopped, with the command that resumes printed when the subcommand can resume.
    """
    start = time.time()
    if getattr(args, "threads", 0):  # the demo's own --threads reaches run_demo too
        import torch

        torch.set_num_threads(args.threads)
    try:
        with stop_signals():
            args.func(args)
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Stopped)
        name = "SIGTERM" if terminated else "Ctrl-C"
        print(f"\nwritesae {args.command}: stopped by {name}.", file=sys.stderr)
        if hasattr(args, "resume"):
            if holds_files(args.out):
                print(f"{args.out} keeps the last checkpoint ({args.resume_note}). Continue with:\n"
                      f"  {resume_command(argv)}", file=sys.stderr)  # fmt: skip
            else:
                print(f"Nothing was saved in {args.out} yet. Start again with:\n  {resume_command(argv, resume=False)}",
                      file=sys.stderr)  # fmt: skip
        return 143 if terminated else 130
    except user_errors() as err:
        print(f"writesae {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - start:.0f} s")
    return 0
