"""Reading jaxprs in tests: the equations of given primitives, nested jaxprs included."""


def equations(jaxpr, primitives) -> list:
  """Every equation of `jaxpr` whose primitive is named in `primitives`, inside nested jaxprs
  (jit, vmap, remat, scan, ...) too."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in primitives:
      out.append(eqn)
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out += equations(inner, primitives)
  return out
