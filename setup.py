"""Installs qarjax: quantization-aware regularizers for JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="qarjax",
    version="0.1.0",
    description="Quantization-aware regularization for neural-network compression in JAX/Flax NNX",
    python_requires=">=3.11",
    packages=find_packages(include=["qarjax", "qarjax.*"]),
    package_data={"qarjax": ["assets/*.tar.gz"]},
    install_requires=[
        "jax>=0.5,<0.12",
        "flax>=0.11,<0.14",
        "optax>=0.2.4,<0.3",
        "chex>=0.1.87",
        "ml_collections>=0.1.1",
        "absl-py>=2.1",
        "orbax-checkpoint>=0.11,<0.13",
        "numpy>=1.26",
        "safetensors>=0.4",
        "pillow>=10",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "tfds": ["tensorflow-datasets>=4.9", "tensorflow-cpu>=2.16"],
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "pytest-rerunfailures>=14",
            "hypothesis>=6.100",
            "scikit-learn>=1.4",
            "ruff>=0.6",
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6.29",
        ],
    },
    entry_points={"console_scripts": ["qarjax=qarjax.cli:run"]},
)
