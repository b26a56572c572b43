"""Model families (T5, BERT, and the decoders Llama, Qwen2, Qwen3, Mistral, Gemma 2) and
Hugging Face checkpoint I/O."""

from lbcl_jax.models.hf import CheckpointError
from lbcl_jax.models.hf import CheckpointNotFoundError
from lbcl_jax.models.hf import Family
from lbcl_jax.models.hf import from_pretrained
from lbcl_jax.models.hf import load_tokenizer
from lbcl_jax.models.hf import register_family
from lbcl_jax.models.hf import save_pretrained
from lbcl_jax.models.t5 import T5
from lbcl_jax.models.t5 import T5Config

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "Family",
    "T5",
    "T5Config",
    "from_pretrained",
    "load_tokenizer",
    "register_family",
    "save_pretrained",
]
