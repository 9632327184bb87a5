"""Is a saved run the run this config names? One rule for the launcher (resume a workdir) and the
drivers (reuse a finished run).

Two configs name the same run when they agree on every key outside `train.*` (logging, checkpoint
cadence, mesh size: bookkeeping that may change on resume) and on the files they read. A file or
folder key names a run by its last path component: moving the data or the weights (a clone whose
`../shared/data` sits elsewhere) keeps a finished run; pointing at another folder or file does
not. The data's contents are pinned by the dataset's archive checksums (ntkcl_jax/data). A key
that the saved config lacks because it was added to the schema (ntkcl_jax/configs/base.py) after
the run was saved counts at the schema's default, so adding a key with a default never orphans a
run.

    diffs = same_run.differences(saved_config_json, config)      # [] when the same run
    same_run.describe(diffs)  ->  "optim.lr: saved 0.02, asked 0.5; data.name: ..."
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Union

import ml_collections

from ntkcl_jax.configs import base
from ntkcl_jax.models import ntkcl

BOOKKEEPING = ("train",)  # sections that never name a run
LOCATIONS = ("data.data_dir", "model.checkpoint")  # named by their last path component


def config_json(config: Union[ml_collections.ConfigDict, Mapping]) -> dict:
  """A config as the JSON dict runs save: 'auto' compute-policy keys resolved for the running
  platform, as the launcher saves them (a dict passes through)."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(ntkcl.resolve_policy(config).to_json_best_effort())
  return dict(config)


def flat(tree: Mapping, prefix: str = "") -> dict:
  """{'section.key': leaf} of the keys that name a run. An empty dict leaves no key (a default
  `model.overrides: {}` is no difference beside a saved `model.overrides.patch_size`); lists and
  tuples compare as tuples."""
  out = {}
  for k, v in tree.items():
    if not prefix and k in BOOKKEEPING:
      continue
    if isinstance(v, Mapping):
      out.update(flat(v, f"{prefix}{k}."))
    elif f"{prefix}{k}" in LOCATIONS and isinstance(v, str):
      out[f"{prefix}{k}"] = os.path.basename(os.path.normpath(v)) if v else v
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def with_schema_defaults(saved: Mapping) -> dict:
  """The flat keys of a saved config, completed with the current schema's defaults for keys
  added since it was written."""
  defaults = flat(config_json(base.get_config()))
  have = flat(saved)
  return {**{k: v for k, v in defaults.items() if k not in have}, **have}


def differences(saved: Mapping, config) -> list[tuple[str, Any, Any]]:
  """[(key, saved value, value asked for)] where a saved run's config differs from `config`
  (a ConfigDict or its JSON dict), sorted by key; [] when they name the same run."""
  have = with_schema_defaults(saved)
  want = with_schema_defaults(config_json(config))
  missing = object()
  return [(k, have.get(k, missing), want.get(k, missing)) for k in sorted(set(have) | set(want))
          if have.get(k, missing) != want.get(k, missing)]


def describe(diffs, limit: int = 8) -> str:
  """'optim.lr: saved 0.02, asked 0.5; ...' (at most `limit` keys, then how many more)."""
  def show(v):
    return "(absent)" if not isinstance(v, (str, int, float, bool, tuple, type(None))) else repr(v)
  parts = [f"{k}: saved {show(a)}, asked {show(b)}" for k, a, b in diffs[:limit]]
  if len(diffs) > limit:
    parts.append(f"and {len(diffs) - limit} more")
  return "; ".join(parts)
