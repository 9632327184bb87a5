"""Empirical NTKs of NTK-CL runs over the trainable PEFT parameters (docs/ntk_design.md).

    from ntk_analysis import kernels
    K = kernels.empirical_ntk(f, peft_params, x1, x2)      # f(params, x) -> (N, O)

Modules: kernels, nt_compat/nt_backend (neural-tangents), readouts, peft, joint, metrics,
linearized, experiments, plots, benchmark.
"""
