"""The config schema every run shares (ml_collections). Benchmark files override fields of this.

Sections: `model` (backbone), `data` (task stream), `method` (NTK-CL and baselines),
`optim` (per-task optimiser), `train` (devices, checkpoints, logging, compilation cache,
profiling, reader threads: bookkeeping that never names a run, ntkcl_jax/same_run.py). Unknown
keys are rejected by the launcher, so every field a module reads must be declared here.
"""
import ml_collections

from ntkcl_jax import switches


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = "ViT-B/16"          # a variant of ntkcl_jax.models.vit.get_config
  c.model.image_size = 224
  c.model.overrides = ml_collections.ConfigDict()  # tiny models: patch_size, hidden_size, ...
  c.model.checkpoint = ""            # local file; '' = random init (tests only)
  c.model.checkpoint_format = "auto"  # auto | vit_jax | augreg | big_vision | timm | hf | ntkcl
  c.model.normalize = "none"         # none | inception | imagenet (official NTK-CL: none)
  # Compute policy (docs/design.md, "Precision, fused attention and remat"). Each of the three
  # keys below may be 'auto': the launcher sets it for the platform the run starts on
  # (ntkcl_jax/models/ntkcl.py AUTO_POLICY: bf16 / JAX's default precision / fused on GPU and
  # TPU, the values below on CPU) and saves the resolved value; the paper configs use 'auto'.
  c.model.dtype = "float32"          # float32 | bfloat16 | auto: compute dtype of the ViT and PEFT
  #                                    layers; parameters, optimiser state and losses stay float32
  # Precision of every matmul of the model and the losses (jax.default_matmul_precision):
  # 'highest' | 'high' | 'default' | 'bfloat16' | 'tensorfloat32' | 'float32' | ... ('' = JAX's
  # default). 'highest' because otherwise TPUs multiply float32 in bf16 passes and GPUs in TF32,
  # and the float32 runs would no longer match the CPU parity tests (tests/test_official_golden.py).
  c.model.matmul_precision = "highest"
  c.model.attention = "einsum"       # einsum (official op order, exact parity) | fused
  #                                    (jax.nn.dot_product_attention: cuDNN flash attention on a
  #                                    GPU in bf16/fp16, vit.attention_implementation) | auto
  c.model.remat = False              # recompute each ViT block in the backward pass (memory)

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar100"           # benchmark or offline set, see ntkcl_jax.data
  c.data.source = "tfds"             # tfds | folder | zip | digits | synthetic | mock
  c.data.data_dir = ""               # root of image folders / tfds data_dir
  c.data.num_classes = 100
  c.data.init_cls = 10
  c.data.increment = 10
  c.data.class_order = "seed"        # seed (official np.random.permutation) | natural | explicit
  c.data.explicit_order = ()         # used when class_order == 'explicit'
  c.data.max_per_class_train = 0     # 0 = all; >0 subsamples (CPU demos)
  c.data.max_per_class_test = 0
  # False: one fixed subsample for every seed; True: drawn per seed, so a spread over seeds also
  # covers which images were drawn (the evidence pages use this).
  c.data.subsample_per_seed = False
  # Train and evaluate only the first N tasks of the protocol (0 = all). Class order, task splits
  # and the EMA schedule stay the full protocol's, so such a run equals the first N tasks of the
  # whole run (the corrections page's two-task runs).
  c.data.tasks_to_run = 0
  c.data.train_transform = "official"  # official (RandomResizedCrop(0.05,1)+flip) | none
  c.data.prefetch = 2

  c.method = ml_collections.ConfigDict()
  c.method.name = "ntkcl"            # ntkcl | channel | patch | simplecil | seq_adapter
  c.method.variant = "official"      # official | corrected
  # Corrected-mode switches method.fix_* (ntkcl_jax/switches.py lists and explains them; each
  # fixes one oddity, honoured when variant == 'corrected'; all off = official).
  for name in switches.NAMES:
    c.method[name] = False
  # Fusion module: attention (official AttentionFusion) | mlp | multimodal (the plain alternatives
  # shipped, unused, in the official fusion_nets.py; ablations only).
  c.method.fusion = "attention"
  c.method.ema_decay = 0.9           # used when fix_ema
  # How the frozen sets follow the current lists at a task end: 'ema' (the adaptive average of
  # docs/method.md §3.4, or fix_ema's constant decay) | 'copy' (overwrite with the last task's
  # values: the EMA ablation at the same architecture and number of frozen sets).
  c.method.frozen_update = "ema"
  c.method.ffn_num = 16
  c.method.ffn_scalar = 0.1
  c.method.adapter_dropout = 0.1
  c.method.fusion_dropout = 0.1
  c.method.num_prompt_tokens = 10
  c.method.frozen_sets = 1           # frozen_prompt_list_num
  c.method.use_init_ptm = False
  c.method.section_weights = (0.3, 0.1)  # [EMA, current]; with init-PTM (1.0, 0.3, 0.1)
  c.method.nce_temp = 0.2
  c.method.dis_temp = 1e-4
  c.method.reg_temp = 1e-3
  c.method.nce_tau = 0.1
  c.method.orth_k = 40

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.025
  c.optim.momentum = 0.9
  c.optim.weight_decay = 5e-4
  c.optim.epochs = 20
  c.optim.batch_size = 16            # global batch
  c.optim.eval_batch_size = 64
  c.topk = 5

  c.train = ml_collections.ConfigDict()
  c.train.mesh_data = -1             # devices of the data-parallel mesh (-1 = all)
  c.train.checkpoint_every_steps = 200
  c.train.keep_checkpoints = 2
  c.train.log_every_steps = 10
  # Persistent XLA compilation cache (set before the first compile; a rerun or resume skips the
  # compiles): 'auto' = the folder JAX was given (JAX_COMPILATION_CACHE_DIR), else on GPU / TPU
  # $NTKCL_CACHE/jax_compilation or ~/.cache/ntkcl_jax/jax_compilation (off on CPU: short
  # compiles, and XLA:CPU logs a false error for each cached program it loads); a path (local or
  # gs://) = that folder on any platform; '' = off.
  c.train.compilation_cache_dir = "auto"
  # Profile train steps: (A, B) traces global train steps A to B (1-based, inclusive; e.g.
  # --config.train.profile_steps=11,15) with jax.profiler into WORKDIR/profile, which
  # TensorBoard's profile tab (`tensorboard --logdir=WORKDIR/profile`) and Perfetto
  # (plugins/profile/*/*.trace.json.gz) open; () = off. Process 0 only. XLA and host activity,
  # without Python function spans (train.trace_options says why).
  c.train.profile_steps = ()
  # Threads decoding and transforming images for the data stream (0 = one per CPU this process
  # may use, at most 32); never changes a batch, only how fast it is ready.
  c.train.reader_threads = 0
  return c
