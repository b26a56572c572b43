"""Checkpoint I/O: HF <-> Flax T5 round trips, file layouts, the registry and bad inputs."""

import dataclasses
import json
import os
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from lbcl_jax.models import hf
from lbcl_jax.models import t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SRC = np.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]], np.int64)
DEC = np.array([[0, 3, 4], [0, 7, 8]], np.int64)


def hf_t5(tied: bool, seed: int = 0, **overrides):
  """A tiny random HF T5: v1.0 (relu, tied) or v1.1 (gated-gelu, untied lm_head)."""
  kwargs = dict(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                decoder_start_token_id=0,
                feed_forward_proj="relu" if tied else "gated-gelu", tie_word_embeddings=tied)
  kwargs.update(overrides)
  with torch.device("meta"):
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kwargs))
  model = model.to_empty(device="cpu")
  model.tie_weights()
  torch.manual_seed(seed)
  if not tied:  # transformers 5 ties lm_head to shared regardless; untie it.
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 1.0 if p.ndim == 1 or "shared" in name or "lm_head" in name
                else p.shape[1]**-0.5)
  return model.eval()


def hf_logits(model, src=SRC, dec=DEC):
  with torch.no_grad():
    return model(input_ids=torch.tensor(src), attention_mask=torch.tensor(src > 0).long(),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()


def our_logits(model, params, src=SRC, dec=DEC):
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(src),
                                         jnp.asarray(src > 0), jnp.asarray(dec)))


def flat(params):
  return flax.traverse_util.flatten_dict(params)


def assert_bit_identical(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k


@pytest.fixture(scope="module", params=["v1_0", "v1_1"])
def saved(request, tmp_path_factory):
  """(HF model, directory it saved itself to)."""
  model = hf_t5(tied=request.param == "v1_0")
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return model, path


def test_import_export_import_is_bit_identical_and_loads_in_transformers(saved, tmp_path):
  hf_model, path = saved
  model, params = hf.from_pretrained(path)
  want = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  got = flat(params)
  np.testing.assert_array_equal(
      got[("encoder", "block_1", "layer_0", "SelfAttention", "o", "kernel")],
      want["encoder.block.1.layer.0.SelfAttention.o.weight"].T)
  np.testing.assert_array_equal(got[("shared", "embedding")], want["shared.weight"])

  out = hf.save_pretrained(model, params, tmp_path / "export")
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  keys = set(safetensors.numpy.load_file(out / "model.safetensors"))
  assert ("lm_head.weight" in keys) == (not model.config.tie_word_embeddings)
  assert "shared.weight" in keys
  model2, params2 = hf.from_pretrained(out)
  assert model2.config == model.config
  assert_bit_identical(params, params2)

  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  np.testing.assert_array_equal(hf_logits(reloaded), hf_logits(hf_model))
  # Every HF tensor survived unchanged.
  for k, v in reloaded.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), want[k], err_msg=k)


@pytest.mark.parametrize("tied", [True, False])
def test_export_of_our_own_init_loads_in_transformers(tied, tmp_path):
  config = t5.T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                       num_decoder_layers=2, num_heads=2,
                       feed_forward_proj="relu" if tied else "gated-gelu",
                       tie_word_embeddings=tied)
  model = t5.T5(config)
  # Random values of the right shapes without compiling an init.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), t5.abstract_params(model))
  hf.save_pretrained(model, params, tmp_path)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
  assert reloaded.config.num_decoder_layers == 2
  np.testing.assert_allclose(hf_logits(reloaded), our_logits(model, params), atol=1e-4)


def test_save_pretrained_replaces_atomically(tmp_path):
  hf_model = hf_t5(tied=True)
  hf_model.save_pretrained(tmp_path / "src")
  model, params = hf.from_pretrained(tmp_path / "src")
  target = tmp_path / "out"
  target.mkdir()
  (target / "stale.bin").write_bytes(b"old")
  hf.save_pretrained(model, params, target)
  hf.save_pretrained(model, params, target)
  assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # No temp dirs left behind.


def test_sharded_safetensors_and_pytorch_bin_load_identically(tmp_path):
  hf_model = hf_t5(tied=False)
  hf_model.save_pretrained(tmp_path / "single")
  hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="8KB")
  assert (tmp_path / "sharded" / hf.SAFETENSORS_INDEX_NAME).is_file()
  assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
  # transformers 5 always writes safetensors; a .bin is a torch.save'd state dict, with the
  # tied aliases (encoder/decoder.embed_tokens) that old checkpoints carry.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
  state = hf_model.state_dict()
  assert "encoder.embed_tokens.weight" in state
  torch.save(state, bin_dir / hf.TORCH_NAME)

  _, reference = hf.from_pretrained(tmp_path / "single")
  for name in ("sharded", "bin"):
    _, params = hf.from_pretrained(tmp_path / name)
    assert_bit_identical(reference, params)


def test_v1_0_bin_with_only_alias_embedding_keys(tmp_path):
  """Old checkpoints may hold the shared table only as encoder/decoder.embed_tokens."""
  hf_model = hf_t5(tied=True)
  hf_model.save_pretrained(tmp_path / "ref")
  state = {k: v for k, v in hf_model.state_dict().items() if k != "shared.weight"}
  (tmp_path / "bin").mkdir()
  (tmp_path / "bin" / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
  torch.save(state, tmp_path / "bin" / hf.TORCH_NAME)
  assert_bit_identical(hf.from_pretrained(tmp_path / "ref")[1],
                       hf.from_pretrained(tmp_path / "bin")[1])


def test_bf16_params_round_trip(saved, tmp_path):
  _, path = saved
  model, params = hf.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert model.config.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
  hf.save_pretrained(model, params, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  _, params2 = hf.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert_bit_identical(params, params2)


def test_config_from_hf_reads_transformers_4_and_5_layouts():
  v5 = t5.FAMILY.config_from_hf(
      {"model_type": "t5", "feed_forward_proj": "gated-gelu", "tie_word_embeddings": True,
       "scale_decoder_outputs": False, "num_layers": 3}, dtype=jnp.float32,
      param_dtype=jnp.float32)
  assert not v5.tie_word_embeddings and v5.num_decoder_layers == 3
  assert v5.dense_act_fn == "gelu_new" and v5.is_gated_act
  v4 = t5.FAMILY.config_from_hf({"tie_word_embeddings": False, "eos_token_id": [1]},
                                 dtype=jnp.float32, param_dtype=jnp.float32)
  assert not v4.tie_word_embeddings and v4.eos_token_id == 1
  assert t5.FAMILY.config_from_hf({}, dtype=jnp.float32,
                                  param_dtype=jnp.float32).tie_word_embeddings
  round_trip = t5.FAMILY.config_from_hf(t5.FAMILY.config_to_hf(v5), dtype=jnp.float32,
                                        param_dtype=jnp.float32)
  assert round_trip == v5


def test_t5_family_lives_in_t5_and_is_found_from_a_model():
  assert hf.get_family("t5") is t5.FAMILY
  assert "t5" in hf.registered_model_types()
  model = t5.T5(t5.T5Config(vocab_size=8, d_model=4, d_kv=2, d_ff=4, num_layers=1, num_heads=2))
  assert hf.family_of_model(model) == ("t5", t5.FAMILY)


def test_register_family_and_hub_ids(tmp_path, monkeypatch):
  """A new model_type plugs in through the registry; hub ids go to snapshot_download."""
  family = dataclasses.replace(t5.FAMILY, name="toy", supported_architectures=("Toy",))
  hf.register_family("toy-t5", family)
  try:
    src = tmp_path / "src"
    hf_t5(tied=True).save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="toy-t5", architectures=["Toy"])
    (src / "config.json").write_text(json.dumps(cfg))
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
      calls.append((repo_id, tuple(allow_patterns), kwargs))
      return str(src)

    import huggingface_hub  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = hf.from_pretrained("someone/toy-t5-small")
    assert isinstance(model, t5.T5)
    assert calls and calls[0][0] == "someone/toy-t5-small"
    assert "*.safetensors" in calls[0][1]
  finally:
    hf._FAMILIES.pop("toy-t5")


# ------------------------------------------------------------------------------ errors


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("good")
  hf_t5(tied=False).save_pretrained(path)
  return path


def copy_checkpoint(src: pathlib.Path, dst: pathlib.Path, tensors=None, config=None):
  dst.mkdir(parents=True, exist_ok=True)
  cfg = json.loads((src / "config.json").read_text()) if config is None else config
  (dst / "config.json").write_text(json.dumps(cfg))
  if tensors is None:
    tensors = safetensors.numpy.load_file(src / "model.safetensors")
  safetensors.numpy.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope") as e:
    hf.from_pretrained(tmp_path / "nope")
  assert isinstance(e.value, hf.CheckpointError)
  with pytest.raises(hf.CheckpointNotFoundError, match="nope"):
    hf.from_pretrained(str(tmp_path / "nope"))


def test_missing_config_and_weights(good_dir, tmp_path):
  (tmp_path / "a").mkdir()
  with pytest.raises(hf.CheckpointNotFoundError, match=r"a/config\.json"):
    hf.from_pretrained(tmp_path / "a")
  (tmp_path / "a" / "config.json").write_text((good_dir / "config.json").read_text())
  with pytest.raises(hf.CheckpointNotFoundError, match=r"no weights file.*model\.safetensors"):
    hf.from_pretrained(tmp_path / "a")


def test_garbled_config_json(good_dir, tmp_path):
  path = copy_checkpoint(good_dir, tmp_path / "c")
  (path / "config.json").write_text('{"model_type": "t5", "d_model": ')
  with pytest.raises(hf.CheckpointError, match=r"c/config\.json: not valid JSON"):
    hf.from_pretrained(path)
  (path / "config.json").write_text('{"model_type": "t5", "d_model": "wide"}')
  with pytest.raises(ValueError, match=r"config\.json.*'d_model'"):
    hf.from_pretrained(path)


def test_unsupported_model_type_and_architecture(good_dir, tmp_path):
  cfg = json.loads((good_dir / "config.json").read_text())
  path = copy_checkpoint(good_dir, tmp_path / "m", config={**cfg, "model_type": "gpt2"})
  with pytest.raises(hf.CheckpointError, match=r"m/config\.json: unsupported model_type 'gpt2'"):
    hf.from_pretrained(path)
  path = copy_checkpoint(good_dir, tmp_path / "a",
                         config={**cfg, "architectures": ["T5ForSequenceClassification"]})
  with pytest.raises(hf.CheckpointError,
                     match=r"a/config\.json: unsupported architecture "
                     r"'T5ForSequenceClassification' \(key 'architectures'\)"):
    hf.from_pretrained(path)


def test_garbled_safetensors(good_dir, tmp_path):
  path = copy_checkpoint(good_dir, tmp_path / "g")
  (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(hf.CheckpointError, match=r"g/model\.safetensors: cannot read"):
    hf.from_pretrained(path)


def test_wrong_shape_missing_and_unexpected_tensors(good_dir, tmp_path):
  tensors = safetensors.numpy.load_file(good_dir / "model.safetensors")
  key = "decoder.block.1.layer.1.EncDecAttention.q.weight"

  bad = dict(tensors, **{key: np.zeros((3, 16), np.float32)})
  path = copy_checkpoint(good_dir, tmp_path / "shape", tensors=bad)
  with pytest.raises(ValueError, match=rf"shape/model\.safetensors: tensor '{key}' has shape "
                     r"\(3, 16\), expected \(8, 16\)"):
    hf.from_pretrained(path)

  bad = {k: v for k, v in tensors.items() if k != key}
  path = copy_checkpoint(good_dir, tmp_path / "missing", tensors=bad)
  with pytest.raises(ValueError, match=rf"missing/model\.safetensors: missing tensor '{key}'"):
    hf.from_pretrained(path)

  bad = dict(tensors, **{"encoder.block.7.layer.0.SelfAttention.q.weight": tensors[key]})
  path = copy_checkpoint(good_dir, tmp_path / "extra", tensors=bad)
  with pytest.raises(ValueError, match=r"extra/model\.safetensors: unexpected tensor "
                     r"'encoder\.block\.7\.layer\.0\.SelfAttention\.q\.weight'"):
    hf.from_pretrained(path)

  # HF's own leftover key is ignored, as transformers does.
  ok = dict(tensors, **{t5._IGNORED_KEYS[0]: np.zeros((8, 2), np.float32)})
  hf.from_pretrained(copy_checkpoint(good_dir, tmp_path / "ignored", tensors=ok))


def test_tied_alias_that_differs_is_an_error(tmp_path):
  hf_t5(tied=True).save_pretrained(tmp_path / "ref")
  tensors = safetensors.numpy.load_file(tmp_path / "ref" / "model.safetensors")
  tensors["lm_head.weight"] = tensors["shared.weight"] + 1.0
  path = copy_checkpoint(tmp_path / "ref", tmp_path / "alias", tensors=tensors)
  with pytest.raises(hf.CheckpointError, match=r"alias/model\.safetensors: tensor "
                     r"'lm_head\.weight' differs from 'shared\.weight'"):
    hf.from_pretrained(path)
