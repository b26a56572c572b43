"""What the HF parity tests of the decoder families (test_llama, test_decoders, test_gemma2)
compare with: both stacks' logits of a left-padded batch, compared over real positions, and
positions as HF's generate derives them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rel_diff(ours, theirs, mask):
  """max |ours - theirs| over real positions, relative to max |theirs| there."""
  valid = np.asarray(mask).astype(bool)
  return float(np.abs(ours - theirs)[valid].max() / np.abs(theirs[valid]).max())


def hf_positions(mask):
  """Positions counted over real tokens, as HF's generate derives them."""
  return np.where(mask > 0, np.cumsum(mask, -1) - 1, 0)


def hf_logits(torch, model, ids, mask):
  """An HF model's float32 logits of a left-padded batch, at `hf_positions`' positions (ours
  derive theirs from the mask the same way)."""
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(hf_positions(mask))).logits.float().numpy()


def our_logits(model, params, ids, mask):
  """Our model's logits of the same batch."""
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids),
                                         jnp.asarray(mask)))


def hf_greedy(torch, model, ids, mask, max_new, eos, pad):
  """HF's greedy new tokens, padded to `max_new` with `pad` (HF stops when all rows end)."""
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         do_sample=False, num_beams=1, max_new_tokens=max_new,
                         eos_token_id=eos, pad_token_id=pad).numpy()[:, ids.shape[1]:]
  return np.pad(out, ((0, 0), (0, max_new - out.shape[1])), constant_values=pad)
