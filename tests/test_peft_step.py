"""An adapter train step of ours vs HF transformers + PEFT: same loss, gradients and update.

The model is a random-weight Llama with SmolLM2-135M's widths (hidden 576, intermediate 1536,
9 heads / 3 KV heads of 64, vocab 49152, rope theta 1e5, tied embeddings, RMSNorm eps 1e-5) and
2 layers, built by transformers and converted by `llama.params_from_hf`. Both stacks train
LoRA r 8 on q_proj / v_proj with O-LoRA's scaling 32 / 8 from the same nonzero A and B (one
numpy RNG), on left-padded batches from our pipeline (`CausalLMData.collate`: prompts of
different lengths, answers ending in EOS, one padding row), dropout off, AdamW at lr 1e-3:

  * ours: the driver's step (`train.make_train_step`) with the run config's optimizer
    (`settings.optimizer_settings` -> `methods.build_optimizer`), method, scaling and apply mode
    (`settings.LoopConfig`), the old adapters merged into the base as the driver does;
  * theirs: HF Trainer's `training_step` + `optimizer.step()` on a PEFT model:
    `LlamaForCausalLM(input_ids, attention_mask, labels)` with labels -100 outside the answers
    (HF's loss: the mean over every answer token of the batch; no position_ids, as the Trainer
    passes none: RoPE sees only position differences, so the left padding's offset is moot),
    `torch.optim.AdamW` with `TrainingArguments`' defaults (betas 0.9 / 0.999, eps 1e-8,
    weight decay 0). For O-LoRA the old adapter is a second, frozen PEFT adapter applied next to
    the new one (O-LoRA's lora_A/B beside loranew_A/B), and the loss adds `lamda_1 * sum_layers
    |A_old A_new^T|.sum() + lamda_2 * sum ||new factor||_2` as O-LoRA's `uie_trainer_lora.py`
    writes it (its defaults 0.5 and 0, ours `config.olora.lambda1` / `lambda2`).

Cases: one step of IncLoRA and of O-LoRA (no clipping in either), and two IncLoRA steps with
HF Trainer's default gradient clipping (max_grad_norm 1.0; O-LoRA's DeepSpeed config takes it by
"auto") against ours with `--config.optim.grad_clip=1.0`: our default is no clipping, the one
optimizer setting in which our default and HF Trainer's differ. The second step checks Adam's
moments and bias correction beyond the sign-like first step.

Tolerances (f32): each step's loss to 1e-5 relative; each step's gradients to 1e-4 of the
largest |g| of the factor; the updated A and B to 1e-5 absolute. Adam's first step moves an
entry by lr * g / (|g| + eps) ~ lr * sign(g), so an entry whose gradient is within float noise
of zero (or of eps) can move by up to +-lr differently in the two stacks: entries with some
step's |g| below 10x the stacks' largest gradient difference for that factor are left out of
the update check (and counted: at most 1e-3 of the entries; about 5 in 30720 here).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lbcl_jax import adapters as adapters_lib
from lbcl_jax import config_lib
from lbcl_jax import methods as methods_lib
from lbcl_jax import settings as settings_lib
from lbcl_jax import train
from lbcl_jax.backbones import base as backbone_base
from lbcl_jax.backbones.llama import LlamaBackbone
from lbcl_jax.data import pipeline
from lbcl_jax.models import llama

torch = pytest.importorskip("torch", reason="the PEFT parity test needs torch")
transformers = pytest.importorskip("transformers", reason="the PEFT parity test needs transformers")
peft = pytest.importorskip("peft", reason="the PEFT parity test needs peft (the [torch] extra)")

# SmolLM2-135M's widths, 2 layers.
SMOLLM2_2L = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                  max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
RANK, ALPHA, LR = 8, 32.0, 1e-3
EOS = PAD = 2
# (prompt length, answer length incl. EOS) per example; the batch has one more (padding) row.
EXAMPLES = [(21, 3), (34, 2), (12, 4)]
BATCH = 4

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4  # of the largest |g| of the factor
PARAM_ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  # torch's intra-op threads busy-wait against JAX's thread pool on a 2-core machine.
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_model():
  """The random SmolLM2-shaped HF model (weights spread so the loss is informative)."""
  cfg = llama.config_to_hf(llama.LlamaConfig(**SMOLLM2_2L))
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      elif "embed_tokens" in name:
        p.normal_(0.0, 0.05)  # tied: logits ~ N(0, ~1) after the final norm
      else:
        p.normal_(0.0, p.shape[1] ** -0.5)
  return model.float()


@pytest.fixture(scope="module")
def ours(hf_model):
  """Our model and params from the HF state dict (the project's own conversion)."""
  config = llama.config_from_hf(hf_model.config.to_dict())
  model = llama.LlamaForCausalLM(config)
  params = llama.params_from_hf({k: v.detach().numpy() for k, v in hf_model.state_dict().items()},
                                config, source="memory")
  return model, params


def make_batch(seed: int) -> dict[str, np.ndarray]:
  """One training batch as the driver's pipeline builds it (left padding, a padding row)."""
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(3, SMOLLM2_2L["vocab_size"], n).tolist() for n, _ in EXAMPLES]
  answers = [rng.integers(3, SMOLLM2_2L["vocab_size"], m - 1).tolist() + [EOS]
             for _, m in EXAMPLES]
  data = pipeline.CausalLMData(
      prompt_ids=prompts, answer_ids=answers,
      label_index=np.zeros(len(EXAMPLES), np.int32),
      prompt_buckets=pipeline.length_buckets(64, 16), answer_buckets=(8,),
      pad_id=PAD, eos_id=EOS, filler=[EOS])
  batch = data.collate(np.arange(len(EXAMPLES)), BATCH)
  assert batch["weight"].tolist() == [1, 1, 1, 0]  # the padding row counts for nothing
  return batch


def hf_labels(batch: dict[str, np.ndarray]) -> np.ndarray:
  """HF's `labels`: the input ids where the token is an answer token of a real row, else -100
  (HF shifts them itself: position t predicts labels[t + 1])."""
  target = np.zeros_like(batch["input_ids"], dtype=bool)
  # Our label_mask[t] marks that position t predicts an answer token input_ids[t + 1].
  target[:, 1:] = batch["label_mask"][:, :-1].astype(bool)
  target &= batch["weight"][:, None] > 0
  assert target.sum() == sum(m for _, m in EXAMPLES)  # every answer token, EOS included
  return np.where(target, batch["input_ids"], -100).astype(np.int64)


def adapter_values(paths, d_shapes, seed):
  """Nonzero LoRA factors {path: (A [r, d_in], B [d_out, r])} from one numpy RNG."""
  rng = np.random.default_rng(seed)
  out = {}
  for path in paths:
    d_in, d_out = d_shapes[path]
    bound = 1.0 / np.sqrt(d_in)
    a = rng.uniform(-bound, bound, (RANK, d_in)).astype(np.float32)
    b = rng.normal(0.0, 0.02, (d_out, RANK)).astype(np.float32)
    out[path] = (a, b)
  return out


def hf_name(path: str) -> str:
  """Our adapted layer path -> the HF module name ('model/layers_0/self_attn/q_proj' ->
  'model.layers.0.self_attn.q_proj')."""
  return re.sub(r"layers_(\d+)", r"layers.\1", path).replace("/", ".")


# ----------------------------------------------------------------------------- ours


def capture_grads() -> optax.GradientTransformation:
  """Passes gradients through unchanged and keeps them in its state (to read them back)."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda updates, state, params=None: (updates, updates))


def our_run(method_name, ours_model, params, batches, new_values, old_values, grad_clip=0.0):
  """The driver's step, once per batch: (losses, grads per step, updated) with grads and the
  updated adapter as {path: (A, B)} numpy."""
  model, base = ours_model, params
  config = config_lib.base_config()
  config.method = method_name
  config.adapters.rank = RANK
  config.adapters.dropout = 0.0  # off in both stacks
  config.optim.learning_rate = LR
  config.optim.grad_clip = grad_clip
  method = methods_lib.get_method(method_name, settings_lib.method_settings(config))
  loop = settings_lib.LoopConfig.from_config(config, method)
  adapter = loop.adapter
  assert adapter.scaling == ALPHA / RANK and loop.grad_accum_steps == 1
  backbone = LlamaBackbone(backbone_base.BackboneConfig(family="llama"), model, None, base)
  paths = adapters_lib.find_targets(base, adapter.targets, family=llama)
  adapter_config = adapters_lib.AdapterConfig(targets=adapter.targets, rank=RANK,
                                              scaling=adapter.scaling,
                                              init=method.adapter_init)
  fresh = adapters_lib.init_new(jax.random.key(0), base, adapter_config, paths)
  flat = adapters_lib.flatten_layers(fresh)
  for path, (a, b) in new_values.items():
    flat[path] = dict(flat[path], V=jnp.asarray(a), U=jnp.asarray(b))
  old = {}
  if old_values:
    old = adapters_lib.unflatten_layers({
        p: {"U": jnp.asarray(b)[None], "sigma": jnp.ones((1, RANK), jnp.float32),
            "V": jnp.asarray(a)[None]} for p, (a, b) in old_values.items()})
  trainable, _ = method.init_adapter(adapters_lib.unflatten_layers(flat), old or None,
                                     lambda n: None)
  # As the driver: the old adapters merged into the base, the regulariser reads them.
  base_eff = adapters_lib.merge(base, old, adapter.scaling) if old else base
  settings = settings_lib.optimizer_settings(config)
  tx = optax.chain(capture_grads(), methods_lib.build_optimizer(method, old or None, settings))
  step = train.make_train_step(backbone, method, tx, scaling=adapter.scaling,
                               dropout=adapter.dropout, apply_mode=adapter.apply_mode)
  opt_state = tx.init(trainable)
  as_ab = lambda t: {p: (np.asarray(t[p]["V"]), np.asarray(t[p]["U"])) for p in new_values}
  losses, grads = [], []
  for i, batch in enumerate(batches):
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    trainable, opt_state, loss = step(trainable, opt_state, base_eff, old, jbatch,
                                      jax.random.key(i))
    losses.append(float(loss))
    grads.append(as_ab(adapters_lib.flatten_layers(opt_state[0])))
  return losses, grads, as_ab(adapters_lib.flatten_layers(trainable))


# ----------------------------------------------------------------------------- HF + PEFT


def trainer_defaults():
  """HF Trainer's optimizer settings unless told otherwise (O-LoRA's scripts set none of them;
  its DeepSpeed config takes them, gradient clipping included, from these by "auto")."""
  args = transformers.TrainingArguments(output_dir="unused", report_to=[])  # writes nothing
  assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.weight_decay,
          args.max_grad_norm) == (0.9, 0.999, 1e-8, 0.0, 1.0)
  return args


def hf_run(hf_model, batches, new_values, old_values, *, lamda_1=0.5, lamda_2=0.0,
           max_grad_norm=None):
  """HF + PEFT, as HF Trainer's `training_step` + `optimizer.step()` (O-LoRA's loss when
  `old_values`), once per batch; `max_grad_norm` clips as the Trainer does (None: not at all).
  Returns (losses, grads per step, updated) as `our_run`."""
  import copy  # pylint: disable=g-import-not-at-top
  args = trainer_defaults()
  lora = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
  model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(**lora),
                              adapter_name="new")
  modules = dict(model.base_model.model.named_modules())
  with torch.no_grad():
    for path, (a, b) in new_values.items():
      m = modules[hf_name(path)]
      m.lora_A["new"].weight.copy_(torch.from_numpy(a))
      m.lora_B["new"].weight.copy_(torch.from_numpy(b))
  if old_values:
    model.add_adapter("old", peft.LoraConfig(**lora))
    with torch.no_grad():
      for path, (a, b) in old_values.items():
        m = modules[hf_name(path)]
        m.lora_A["old"].weight.copy_(torch.from_numpy(a))
        m.lora_B["old"].weight.copy_(torch.from_numpy(b))
    # Both applied as low-rank paths, as O-LoRA's frozen lora_A/B next to loranew_A/B.
    model.base_model.set_adapter(["old", "new"])
  for name, p in model.named_parameters():
    p.requires_grad_(".new." in name and "lora_" in name)
  trainable = [p for p in model.parameters() if p.requires_grad]
  assert len(trainable) == 2 * len(new_values)
  optimizer = torch.optim.AdamW(trainable, lr=LR, betas=(args.adam_beta1, args.adam_beta2),
                                eps=args.adam_epsilon, weight_decay=args.weight_decay)
  model.train()
  factor = lambda p, name: getattr(modules[hf_name(p)], name)["new"].weight
  losses, grads = [], []
  for batch in batches:
    loss = model(input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
                 attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)),
                 labels=torch.from_numpy(hf_labels(batch))).loss
    if old_values:  # O-LoRA's uie_trainer_lora.py training_step, term for term
      orthogonal, l2 = 0.0, 0.0
      for path in new_values:
        m = modules[hf_name(path)]
        orthogonal = orthogonal + torch.abs(
            torch.mm(m.lora_A["old"].weight, m.lora_A["new"].weight.T)).sum()
        l2 = l2 + torch.norm(m.lora_A["new"].weight, p=2) + torch.norm(m.lora_B["new"].weight,
                                                                        p=2)
      loss = loss + orthogonal * lamda_1 + l2 * lamda_2
    optimizer.zero_grad()
    loss.backward()
    grads.append({p: (factor(p, "lora_A").grad.numpy().copy(),
                      factor(p, "lora_B").grad.numpy().copy()) for p in new_values})
    if max_grad_norm is not None:
      torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    losses.append(float(loss.detach()))
  updated = {p: (factor(p, "lora_A").detach().numpy().copy(),
                 factor(p, "lora_B").detach().numpy().copy()) for p in new_values}
  return losses, grads, updated


# ----------------------------------------------------------------------------- the tests


def setup_values(params, method_name):
  paths = adapters_lib.find_targets(params, "qv", family=llama)
  assert len(paths) == 2 * SMOLLM2_2L["num_hidden_layers"]
  shapes = {p: adapters_lib.get_kernel(params, p).shape for p in paths}
  new_values = adapter_values(paths, shapes, seed=2)
  old_values = adapter_values(paths, shapes, seed=3) if method_name == "olora" else {}
  return paths, new_values, old_values


def compare(ours, theirs, new_values, label):
  """Asserts the tolerances of the module docstring; returns the max differences."""
  (losses, grads, updated), (ref_losses, ref_grads, ref_updated) = ours, theirs
  report = {}
  for i, (loss, ref) in enumerate(zip(losses, ref_losses)):
    report[f"loss {i + 1}"] = abs(loss - ref) / abs(ref)
    assert abs(loss - ref) <= LOSS_RTOL * abs(ref), (label, i, loss, ref)
  skipped = 0
  for path, values in new_values.items():
    for j, name in enumerate("AB"):
      comparable = np.ones(values[j].shape, bool)
      for i, (g_step, rg_step) in enumerate(zip(grads, ref_grads)):
        g, rg = g_step[path][j], rg_step[path][j]
        scale = np.abs(rg).max()
        assert scale > 0, (label, path, name)
        err = np.abs(g - rg).max()
        key = f"grad {name} step {i + 1}"
        report[key] = max(report.get(key, 0.0), float(err / scale))
        assert err <= GRAD_RTOL * scale, (label, path, name, i, err / scale)
        # A gradient within 10x the stacks' largest difference of zero may differ in sign (or,
        # near Adam's eps, in g / (|g| + eps)) and so move its entry by up to +-lr: an entry is
        # checked when every step's gradient is clear of that.
        comparable &= np.abs(rg) > 10 * err
      skipped += int((~comparable).sum())
      diff = np.abs(updated[path][j] - ref_updated[path][j])
      report[f"updated {name}"] = max(report.get(f"updated {name}", 0.0),
                                      float(diff[comparable].max()))
      assert diff[comparable].max() <= PARAM_ATOL, (label, path, name)
      assert diff.max() <= 2 * LR * len(grads), (label, path, name)
      # Every checked entry moved (by about lr per step).
      assert np.all(np.abs(ref_updated[path][j] - values[j])[comparable] > 0.1 * LR)
  total = sum(a.size + b.size for a, b in new_values.values())
  assert skipped <= 1e-3 * total, (label, skipped, total)
  report["near-zero gradients left out"] = f"{skipped}/{total}"
  print(f"{label}: losses {losses} vs {ref_losses}; max differences {report}")
  return report


@pytest.mark.parametrize("method_name", ["inclora", "olora"])
def test_one_step_matches_hf_peft(method_name, hf_model, ours):
  """One step from the same adapter: loss, gradients and updated factors (no clipping)."""
  model, params = ours
  _, new_values, old_values = setup_values(params, method_name)
  batches = [make_batch(seed=1)]
  ours_out = our_run(method_name, model, params, batches, new_values, old_values)
  # O-LoRA's defaults lamda_1 = 0.5, lamda_2 = 0, as our config's olora.lambda1 / lambda2.
  theirs = hf_run(hf_model, batches, new_values, old_values, lamda_1=0.5, lamda_2=0.0)
  compare(ours_out, theirs, new_values, method_name)


def test_two_clipped_steps_match_hf_trainer_defaults(hf_model, ours):
  """Two steps with HF Trainer's default clipping (max_grad_norm 1.0, which O-LoRA's runs
  use through DeepSpeed's "auto"): ours needs `--config.optim.grad_clip=1.0` for it (its
  default is no clipping). The second step checks Adam's moments and bias correction beyond
  the sign-like first step; the clipping acts on both steps here."""
  model, params = ours
  _, new_values, _ = setup_values(params, "inclora")
  batches = [make_batch(seed=1), make_batch(seed=4)]
  clip = trainer_defaults().max_grad_norm
  ours_out = our_run("inclora", model, params, batches, new_values, {}, grad_clip=clip)
  theirs = hf_run(hf_model, batches, new_values, {}, max_grad_norm=clip)
  for step_grads in theirs[1]:
    norm = np.sqrt(sum(float((g**2).sum()) for ab in step_grads.values() for g in ab))
    assert norm > 2 * clip, norm  # the clipping changes the steps
  compare(ours_out, theirs, new_values, "inclora, clipped, 2 steps")
