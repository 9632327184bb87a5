"""Empirical NTKs of NTK-CL runs over the trainable PEFT parameters (docs/ntk_design.md).

    from ntk_analysis import kernels
    kernel_fn = kernels.ntk_fn(f, trace=True)     # f(params, x) -> (N, O)
    K = kernel_fn(peft_params, x1, x2)

Modules: kernels (ntk_fn), readouts, param_groups, joint, metrics, linearized, experiments (a)-(f),
plots, analyse (CLI: kernels of a run's checkpoints), nt_compat (neural-tangents), benchmark.
"""
