"""Small pytree helpers for nested parameter dicts: flatten by path, split by predicate, deep merge.

The NTK-CL model keeps one frozen backbone and several PEFT parameter sets; every forward pass
merges the backbone with one PEFT set, and the NTK analysis differentiates only the PEFT part.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from flax import traverse_util

Params = Mapping[str, Any]


def flatten(tree: Params, sep: str = "/") -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  return traverse_util.flatten_dict(_as_dict(tree), sep=sep)


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dict."""
  return traverse_util.unflatten_dict(dict(flat), sep=sep)


def split(tree: Params, predicate: Callable[[str], bool]) -> tuple[dict, dict]:
  """Splits a nested dict into (paths where predicate(path) is true, the rest)."""
  flat = flatten(tree)
  yes = {k: v for k, v in flat.items() if predicate(k)}
  no = {k: v for k, v in flat.items() if not predicate(k)}
  return unflatten(yes), unflatten(no)


def merge(*trees: Params) -> dict:
  """Deep-merges nested dicts; a path present in two trees is an error (no silent overwrite)."""
  out: dict[str, Any] = {}
  for tree in trees:
    for k, v in flatten(tree).items():
      if k in out:
        raise ValueError(f"merge: parameter {k!r} is present in more than one tree")
      out[k] = v
  return unflatten(out)


def _as_dict(tree: Params) -> dict:
  if hasattr(tree, "unfreeze"):
    tree = tree.unfreeze()
  return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
