"""`get_config(arg)` argument parsing shared by the config files (big_vision's parse_arg style).

`--config=configs/NAME.py:key=value,flag,other=3` reaches `get_config('key=value,flag,other=3')`;
`parse_arg(arg, key=default, ...)` returns a ConfigDict with each default replaced by the value
given (converted to the default's type; a bare `flag` means True). Unknown keys are an error.
"""
import ml_collections


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; this config accepts {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes", "y")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out
