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
import traceback
from typing import Callable, Iterator, Optional, Sequence

from absl import app as absl_app
from absl import flags as absl_flags

EXIT_INPUT = 2
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class InputError(Exception):
  """A problem with what the user gave (paths, files, flags), explained in its message."""


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


def fail(e: BaseException, prog: Optional[str] = None, code: int = EXIT_INPUT):
  """Prints `prog: error: message` and exits with `code` (the traceback with NTKCL_TRACEBACK=1).

  prog=None names the running program; prog='' prints `error: message` alone."""
  if os.environ.get("NTKCL_TRACEBACK"):
    raise e
  prog = _prog() if prog is None else prog
  print(f"{prog}: error: {message(e)}" if prog else f"error: {message(e)}", file=sys.stderr,
        flush=True)
  sys.exit(code)


def guard(fn: Callable, errors: tuple = INPUT_ERRORS, prog: Optional[str] = None) -> Callable:
  """Wraps a main function so that input errors end the program with one line and exit 2."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except errors as e:
      fail(e, prog)
  return wrapped


def run(fn: Callable, argv: Optional[Sequence[str]] = None, errors: tuple = INPUT_ERRORS,
        prog: Optional[str] = None):
  """Calls fn(argv) under `guard` (for argparse-style mains)."""
  return guard(fn, errors, prog)(argv)


# ----------------------------------------------------------------------------------------------
# absl flags and ml_collections config files
# ----------------------------------------------------------------------------------------------
def _chain(e: Optional[BaseException]) -> Iterator[BaseException]:
  """e, then what it was raised from or during, down to the original exception."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _where(e: BaseException) -> str:
  """' (at file:line)' of the line that raised e, relative to the working directory if below it."""
  if isinstance(e, SyntaxError) and e.filename:
    filename, line = e.filename, e.lineno
  else:
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
      return ""
    filename, line = tb[-1].filename, tb[-1].lineno
  rel = os.path.relpath(filename)
  return f" (at {filename if rel.startswith('..') else rel}:{line})"


# The per-benchmark files `configs/<benchmark>_<backbone>.py` that configs/ntkcl_benchmarks.py
# replaced (its config args `benchmark=` and `backbone=` select the same configs).
REPLACED_BENCHMARKS = ("cifar100", "imagenet_r", "imagenet_a", "domainnet", "oxford_pets",
                       "eurosat", "plantvillage", "vtab", "kvasir")
REPLACED_BACKBONES = ("in21k", "in1k")


def replaced_config_hint(spec: str) -> Optional[str]:
  """For a missing `configs/<benchmark>_<backbone>.py[:arg]`, the one-line message naming the
  configs/ntkcl_benchmarks.py command that replaced it (its arg kept); None for any other path."""
  path, _, arg = spec.partition(":")
  name = os.path.basename(path)
  stem, _, backbone = name[:-3].rpartition("_") if name.endswith(".py") else ("", "", "")
  if os.path.isfile(path) or stem not in REPLACED_BENCHMARKS or backbone not in REPLACED_BACKBONES:
    return None
  new = os.path.join(os.path.dirname(path), "ntkcl_benchmarks.py")
  args = f"benchmark={stem},backbone={backbone}" + (f",{arg}" if arg else "")
  return (f"{path} was replaced by {new}:{args} (config args: ckpt=..., data_dir=..., "
          f"variant=official|corrected)")


def config_file_error(e: BaseException, spec: str, flag: str = "config") -> InputError:
  """The InputError for a config file `path.py[:arg]` that is missing or whose code raised e
  (the root of e's chain): a config file is user input, so its failure is explained, not traced."""
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    hint = replaced_config_hint(spec)
    if hint:
      return InputError(hint)
    return InputError(f"config file not found: {path!r} (--{flag}); the project's config files "
                      f"are in {CONFIG_DIR}")
  root = list(_chain(e))[-1]
  return InputError(f"config file {spec!r} (--{flag}) raised {type(root).__name__}: "
                    f"{message(root)}{_where(root)}; fix the file or its argument")


def flag_parse_error(e: BaseException) -> Optional[InputError]:
  """An InputError for an exception raised while absl parsed the flags, when it was caused by a
  config file (ml_collections config_flags) or a `--config.KEY` override; None otherwise."""
  for x in _chain(e):
    for frame, _ in traceback.walk_tb(x.__traceback__):
      owner = frame.f_locals.get("self")
      if frame.f_code.co_name == "parse" and type(owner).__name__ == "ConfigFileFlagParser":
        return config_file_error(x, str(frame.f_locals.get("path", "")),
                                 getattr(owner, "name", "config"))
      if (frame.f_code.co_name == "_parse" and "field_path" in frame.f_locals
          and isinstance(x, (AttributeError, KeyError))):
        name, key = getattr(owner, "name", "config"), frame.f_locals["field_path"]
        return InputError(f"--{name}.{key}: the config of --{name} has no field {key!r}; check "
                          f"the key's spelling")
  return None


def parse_flags(argv: Sequence[str], prog: Optional[str] = None) -> list:
  """absl `flags_parser`: an unknown flag, a bad flag value or a config file that cannot be
  loaded ends the program with one `prog: error:` line and exit 2 (absl prints FATAL and exit 1,
  ml_collections a traceback)."""
  flag_values = absl_flags.FLAGS
  try:
    rest = flag_values(list(argv))
  except Exception as e:  # pylint: disable=broad-except
    err = flag_parse_error(e)
    if err is None and isinstance(e, absl_flags.Error):
      hint = " (--helpfull lists the flags)" if "Unknown command line flag" in str(e) else ""
      err = InputError(message(e) + hint)
    if err is None or os.environ.get("NTKCL_TRACEBACK"):
      raise
    fail(err, prog)
  # config_flags keeps a config file that failed to load (e.g. a missing one) as a placeholder
  # that raises only when used; report it now.
  for name in list(flag_values):
    value = flag_values[name].value
    if type(value).__name__ == "_ErrorConfig":
      err = flag_parse_error(object.__getattribute__(value, "_error"))
      fail(err or InputError(f"--{name}: {message(object.__getattribute__(value, '_error'))}"),
           prog)
  return rest
