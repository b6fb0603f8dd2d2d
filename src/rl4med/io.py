"""Atomic file and folder writes: an output is either complete or absent, never half-written."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:  # pandas costs a fan-out job 0.2 s to import; only tables need it
    import pandas as pd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_table(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write a CSV (``.csv``) or TSV (anything else) atomically."""
    sep = "," if str(path).endswith(".csv") else "\t"
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep=sep, index=False)


def setup_logging(log_file: str | os.PathLike[str] | None = None) -> logging.Logger:
    """Log to the rule's log file, so Snakemake keeps a record of every job.

    With a log file, stderr (tqdm progress bars, warnings) is redirected there too.
    """
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        sys.stderr = open(log_file, "w", buffering=1)  # noqa: SIM115 - lives as long as the job
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    return logging.getLogger("rl4med")


STEP_DONE = "step finished in"


def process_age() -> float | None:
    """Seconds since this process started (Linux), so a job's time includes its imports."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def end_process() -> NoReturn:
    """End a finished job's process without the interpreter's teardown.

    At exit, Python frees its modules one by one: with torch, diffusers and transformers loaded
    that took 1.3 s of a generate job's 9.5 s on 2 cores (measured; benchmarks/startup.py), paid
    by every one of the evaluation's fan-out jobs. What an exit must do still happens, in the
    interpreter's order: non-daemon threads are joined, exit handlers run (logging's flush and
    close, any writer registered with ``atexit``), the streams are flushed. Outputs were already
    renamed into place (``atomic_path``/``atomic_dir``), so nothing is left half-written.
    """
    # CPython's own call at exit: threading's exit hooks first, which stop idle executor workers
    # (torch.compile's compile pool: joined without them, a generate job with sd.compile waited
    # for ever), then every non-daemon thread joined
    threading._shutdown()
    atexit._run_exitfuncs()  # CPython's own call at exit (logging.shutdown among them)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):  # a closed or absent stream has nothing to flush
            stream.flush()
    os._exit(0)


def run_step(
    step: Callable[[], object],
    log_file: str | os.PathLike[str] | None,
    rule: str = "",
    end: bool = False,
) -> None:
    """Run a workflow step: log to its log file; bad input ends it with the message, no traceback.

    ``ValueError`` (and its subclass ``DataError``) means the user's input is wrong: the message
    names the file/key/row, so a stack trace would only hide it. ``end=True`` (the entry points
    in scripts/, whose process is the job) ends the process when the step is done, without the
    interpreter's teardown (``end_process``).
    """
    log = setup_logging(log_file)
    if os.environ.get("SLURM_JOB_ID"):  # where the job ran, for the log's reader (and tests)
        log.info("Slurm job %s on %s", os.environ["SLURM_JOB_ID"], os.uname().nodename)
    start = time.perf_counter()
    try:
        step()
    except ValueError as err:
        log.error("%s", err)
        where = f" (see {log_file})" if log_file else ""
        print(f"rl4med: error{where}: {err}", file=sys.__stderr__)
        raise SystemExit(1) from None
    # read back by rl4med.showcase for the wall time per rule (imports included where known)
    age = process_age()
    seconds = age if age is not None else time.perf_counter() - start
    log.info("%s %.1f s (rule %s)", STEP_DONE, seconds, rule or "-")
    if end:
        end_process()
