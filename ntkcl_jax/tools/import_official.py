r"""Official NTK-CL PyTorch state dict <-> our variables directory.

    python -m ntkcl_jax.tools.import_official --state_dict=model.pth \
        --config=configs/ntkcl_benchmarks.py:benchmark=cifar100,backbone=in21k \
        --output=DIR            # writes DIR/variables.npz and DIR/meta.json
    python -m ntkcl_jax.tools.import_official --export --variables=DIR --output=model.pth

DIR/variables.npz holds flat '/'-joined arrays under the top-level groups of
`ntkcl_jax.checkpoints.official.from_official` (backbone, trainable, frozen, reg_ref, prototypes,
proxy); `load_variables(DIR)` returns the nested dict. Names and transpositions: the module
docstring of ntkcl_jax/checkpoints/official.py.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile

from absl import app, flags
import numpy as np

from ntkcl_jax import cli
from ntkcl_jax import config_files
from ntkcl_jax import tree_utils
from ntkcl_jax.checkpoints import official
from ntkcl_jax.models import ntkcl


def save_variables(directory: str, variables: dict, meta: dict | None = None) -> str:
  os.makedirs(directory, exist_ok=True)
  flat = {k: np.asarray(v) for k, v in tree_utils.flatten(variables).items()}
  tmp = os.path.join(directory, "variables.tmp.npz")
  np.savez(tmp, **flat)
  os.replace(tmp, os.path.join(directory, "variables.npz"))
  with open(os.path.join(directory, "meta.json"), "w") as f:
    json.dump(meta or {}, f, indent=1)
  return directory


def load_variables(directory: str) -> dict:
  path = os.path.join(directory, "variables.npz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: create it with `python -m "
                            "ntkcl_jax.tools.import_official --state_dict=... --output=DIR`")
  try:
    with np.load(path) as f:
      return tree_utils.unflatten({k: f[k] for k in f.files})
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); the file is corrupt or "
                     "truncated: import the state dict again") from e


def import_official(state_dict_path: str, output: str, num_heads: int = 12,
                    config_name: str = "") -> dict:
  """Reads an official .pth (torch needed) and writes our variables directory."""
  import torch  # pylint: disable=g-import-not-at-top  # optional: only .pth files need torch
  sd = torch.load(state_dict_path, map_location="cpu", weights_only=True)
  if isinstance(sd, dict) and "state_dict" in sd:
    sd = sd["state_dict"]
  variables = official.from_official(sd, num_heads=num_heads)
  save_variables(output, variables, {"source": os.path.abspath(state_dict_path),
                                     "config": config_name, "num_heads": num_heads,
                                     "frozen_sets": official.num_frozen_sets(
                                         {k: None for k in sd})})
  return variables


def export_official(variables_dir: str, output: str, num_heads: int = 12) -> dict:
  """Writes our variables directory as an official PromptNet state dict (.pth)."""
  import torch  # pylint: disable=g-import-not-at-top  # optional: only .pth files need torch
  sd = official.to_official(load_variables(variables_dir), num_heads=num_heads)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, output)
  return sd


def main(argv=None):
  flags.DEFINE_string("state_dict", "", "official NTK-CL state dict (.pth)")
  flags.DEFINE_string("config", "", "our config file the run corresponds to (for num_heads and "
                      "the record in meta.json)")
  flags.DEFINE_string("output", "", "import: output directory; export: output .pth file")
  flags.DEFINE_bool("export", False, "export DIR (--variables) to an official .pth instead")
  flags.DEFINE_string("variables", "", "with --export: our variables directory")
  flags.DEFINE_integer("num_heads", 0, "attention heads (default: from --config, else 12)")
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name

  def run(_):
    if not FLAGS.output:
      raise cli.InputError("--output is required (import: a directory; --export: a .pth file)")
    sd_path = FLAGS.state_dict
    if not FLAGS.export:  # checked before torch is imported: a file torch.load can read
      if not sd_path or not os.path.isfile(sd_path):
        raise cli.InputError(f"--state_dict={sd_path!r}: file not found; pass the official "
                             "NTK-CL checkpoint (.pth)")
      with open(sd_path, "rb") as f:
        head = f.read(2)
      if not (zipfile.is_zipfile(sd_path) or head[:1] == b"\x80"):  # torch zip or legacy pickle
        raise cli.InputError(f"--state_dict={sd_path}: not a PyTorch checkpoint (neither a "
                             "torch.save zip archive nor a pickle); the file is corrupt or of "
                             "another kind")
    heads = FLAGS.num_heads or 12
    if FLAGS.config and not FLAGS.num_heads:
      heads = ntkcl.vit_config(config_files.load_config_file(FLAGS.config)).num_heads
    if FLAGS.export:
      sd = export_official(FLAGS.variables, FLAGS.output, heads)
      print(f"wrote {len(sd)} tensors to {FLAGS.output}")
    else:
      try:
        v = import_official(sd_path, FLAGS.output, heads, FLAGS.config)
      except pickle.UnpicklingError as e:
        raise cli.InputError(f"--state_dict={sd_path}: torch.load cannot read it as a state dict "
                             f"of tensors ({cli.message(e).split('. ')[0]})") from e
      print(f"wrote {FLAGS.output}/variables.npz: groups {sorted(v)}")
  app.run(cli.guard(run), argv=argv, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  main()
