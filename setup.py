"""qlora70: a from-scratch QLoRA library (NF4 + double quantization, LoRA, Triton kernels) for Llama-2."""
from setuptools import setup

setup(
    name="qlora70",
    version="0.1.0",
    description="From-scratch QLoRA for Llama-2: NF4 + double quantization, LoRA, Triton kernels, medical QA evaluation",
    python_requires=">=3.10",
    # kernels/ is installed as qlora70.kernels, never as a top-level `kernels` package (that name is taken on PyPI).
    packages=["qlora70", "qlora70.kernels", "qlora70.tasks"],
    package_dir={"qlora70": "qlora70", "qlora70.kernels": "kernels", "qlora70.tasks": "qlora70/tasks"},
    # The CPU NF4 fast path's C source, compiled at first use (qlora70/native.py); no build step at install time.
    package_data={"qlora70": ["csrc/*.c"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.4; platform_system == 'Linux'",
        "safetensors>=0.4",
        "sentencepiece>=0.1.99",
        "numpy>=1.24",
        "gguf>=0.10",        # read/write llama.cpp GGUF files
        "tokenizers>=0.15",  # byte-level BPE (tokenizer.json) parity
        "tqdm>=4.60",        # progress bars
        "matplotlib>=3.7",   # loss curves and benchmark plots
    ],
    extras_require={
        # Reference oracles: used by tests only, never imported by the library.
        "test": ["pytest>=7", "transformers>=4.45", "peft>=0.13", "bitsandbytes>=0.45", "accelerate>=0.34",
                 "protobuf"],  # protobuf: transformers' slow LlamaTokenizer oracle
        "demo": [],
        # Benchmark peers (optional): torchao's NF4Tensor.
        "bench": ["torchao"],
        # llama.cpp itself, to run exported GGUF files (its tests skip without it). It builds llama.cpp from source
        # (~20-50 min on 2 cores); for a portable build: CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
        # -DGGML_F16C=ON" pip install ".[llamacpp]"
        "llamacpp": ["llama-cpp-python>=0.3.36"],
    },
    entry_points={"console_scripts": ["qlora70=qlora70.cli:main"]},
)
