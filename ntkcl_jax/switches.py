"""The corrected-mode switches (docs/method.md §10; docs/variants.md): the one list of them.

Each switch fixes one oddity of the official code and is independent of the others; all off is
the official method. Every list of switch names in the project (the config schema, the pages'
arms, the sweeps' controls) is `NAMES` or a named filter of it.

    switches.NAMES                      # every switch, in this order
    switches.affecting(init_cls=2, increment=2)   # those that can change a run of that split
    switches.from_config(config)        # the Switches a config's method section asks for
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Switches:
  """One field per switch; docs/variants.md gives each one's official behaviour and our fix."""
  fix_fusion: bool = False      # attention fusion over two tokens (Q, K reach the output)
  fix_nce_sign: bool = False    # +NCE: same-class features pulled together
  fix_orth: bool = False        # squared projection onto the old prototypes' span
  fix_l2_all: bool = False      # L2-to-previous on every trainable parameter, biases included
  fix_ema: bool = False         # constant-decay EMA instead of the running mean
  fix_patch_init: bool = False  # non-zero init of the patch token mixing and LN gamma
  # NCE's old prototypes from earlier tasks only (official `fc.weight[:-increment]`): changes a
  # run only when the first task has more classes than the others (init_cls > increment).
  fix_old_pool: bool = dataclasses.field(default=False, metadata={"uneven_split_only": True})


NAMES = tuple(f.name for f in dataclasses.fields(Switches))


def affecting(init_cls: int, increment: int) -> tuple:
  """The switches that can change a run whose split has these sizes (all of them, except the
  uneven-split ones when init_cls == increment)."""
  return tuple(f.name for f in dataclasses.fields(Switches)
               if init_cls != increment or not f.metadata.get("uneven_split_only"))


def from_config(config) -> Switches:
  """The one gate of the switches: method.variant='official' forces all off, 'corrected' honours
  each method.fix_* as set."""
  m = config.method
  if m.variant not in ("official", "corrected"):
    raise ValueError(f"method.variant must be 'official' or 'corrected', got {m.variant!r}")
  return Switches(**{s: bool(m[s]) and m.variant == "corrected" for s in NAMES})


def from_flat(flat: dict) -> dict:
  """{switch: effective value} of a flat saved config ({'method.fix_orth': True, ...}); absent
  switches are off."""
  corrected = flat.get("method.variant") == "corrected"
  return {s: bool(flat.get(f"method.{s}", False)) and corrected for s in NAMES}
