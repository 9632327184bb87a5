"""Command-line error handling shared by every entry point: bad input becomes one line, not a trace.

    def main(argv=None):
      cli.run(_main, argv)          # argparse-style: _main(argv) parses and runs
    app.run(cli.guard(_main), flags_parser=cli.parse_flags)   # absl-style

An error about the user's input (a missing file, a corrupt checkpoint, a directory that is not a
run, an unknown dataset, a bad flag or config file) is printed as `prog: error: message` on stderr
with exit code 2. Set NTKCL_TRACEBACK=1 to see the Python traceback instead (for bug reports).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional, Sequence

from absl import app as absl_app
from absl import flags as absl_flags

EXIT_INPUT = 2


class InputError(Exception):
  """A problem with what the user gave (paths, files, flags), explained in its message."""


class Stop(RuntimeError):
  """A run that stopped on purpose and kept its last checkpoint (rerunning resumes): one
  `label: message` line and exit `code` (ntkcl_jax.train: a non-finite loss, 3; SIGTERM, 143),
  from the launcher and from every script that trains through it."""
  code, label = 1, "stopped"


# What counts as the user's input being wrong. Checkpoint and data errors of this package derive
# from ValueError / FileNotFoundError (ntkcl_jax.checkpoints.errors, ntkcl_jax.data); absl's
# UsageError is what absl mains raise for a missing flag.
INPUT_ERRORS = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError, ValueError, KeyError, EOFError, absl_app.UsageError)


def _prog() -> str:
  name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "ntkcl"
  return name[:-3] if name.endswith(".py") else name


def message(e: BaseException) -> str:
  """One line: the exception's own text (KeyError's repr quotes are dropped), else its type."""
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  text = " ".join(text.split())
  return text or type(e).__name__


def fail(e: BaseException, prog: Optional[str] = None, code: int = EXIT_INPUT,
         label: str = "error"):
  """Prints `prog: label: message` and exits with `code` (the traceback with NTKCL_TRACEBACK=1,
  except for a Stop: its exit code is what schedulers read).

  prog=None names the running program; prog='' prints `label: message` alone."""
  if os.environ.get("NTKCL_TRACEBACK") and not isinstance(e, Stop):
    raise e
  prog = _prog() if prog is None else prog
  print(f"{prog}: {label}: {message(e)}" if prog else f"{label}: {message(e)}", file=sys.stderr,
        flush=True)
  sys.exit(code)


def guard(fn: Callable, errors: tuple = INPUT_ERRORS, prog: Optional[str] = None) -> Callable:
  """Wraps a main function so that input errors end the program with one line and exit 2, and a
  run's Stop with its own line and code."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except errors as e:
      fail(e, prog)
    except Stop as e:
      fail(e, prog, e.code, e.label)
  return wrapped


def run(fn: Callable, argv: Optional[Sequence[str]] = None, errors: tuple = INPUT_ERRORS,
        prog: Optional[str] = None):
  """Calls fn(argv) under `guard` (for argparse-style mains)."""
  return guard(fn, errors, prog)(argv)


# ----------------------------------------------------------------------------------------------
# absl flags
# ----------------------------------------------------------------------------------------------
def parse_flags(argv: Sequence[str], prog: Optional[str] = None) -> list:
  """absl `flags_parser`: an unknown flag or a bad flag value ends the program with one
  `prog: error:` line and exit 2 (absl prints FATAL and exits 1). Config files and their
  `--config.KEY` overrides are not absl flags: ntkcl_jax.config_files.from_argv takes them out of
  argv first."""
  try:
    return absl_flags.FLAGS(list(argv))
  except absl_flags.Error as e:
    if os.environ.get("NTKCL_TRACEBACK"):
      raise
    hint = " (--helpfull lists the flags)" if "Unknown command line flag" in str(e) else ""
    fail(InputError(message(e) + hint), prog)


def run_program(main: Callable, define: Callable, argv: Optional[Sequence[str]] = None, *,
                doc: str = "", take: Optional[Callable] = None, prog: Optional[str] = None):
  """The one way the project's scripts and benchmarks run (`python -m scripts.NAME`,
  `python -m benchmarks.NAME`): their flags live on a private absl FlagValues (`define(fv)`
  registers them), so programs imported into one process never clash; `--help` prints `doc` and
  the flags; a bad flag or any input error ends with one `prog: error:` line and exit 2.

  take(argv) -> (kwargs, rest): what the program takes out of argv before its flags are parsed,
  passed to main as keyword arguments (a config file and its overrides:
  ntkcl_jax.config_files.take_config). `argv`: the arguments after the program name (default
  sys.argv[1:]). Returns main(fv, **kwargs), 0 where main returns None."""
  argv = [sys.argv[0] if sys.argv else "prog", *(sys.argv[1:] if argv is None else argv)]

  def go():
    kwargs, rest = take(argv) if take else ({}, argv)
    fv = absl_flags.FlagValues()
    define(fv)
    if any(a in ("--help", "-h", "--helpfull") for a in rest[1:]):
      print(doc.strip() + "\n\nflags:\n" + fv.get_help())
      return 0
    try:
      fv(rest)
    except absl_flags.Error as e:
      hint = " (--help lists the flags)" if "Unknown command line flag" in str(e) else ""
      raise InputError(message(e) + hint) from e
    out = main(fv, **kwargs)
    return 0 if out is None else out
  return guard(go, prog=prog)()


def program(main: Callable, define: Callable, doc: str = "",
            take: Optional[Callable] = None) -> Callable:
  """`main(argv=None)` of a script or benchmark: run_program with its flags, docstring and
  `take` (`main = cli.program(_main, define_flags, __doc__)`)."""
  return functools.partial(run_program, main, define, doc=doc, take=take)
