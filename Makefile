# Shortcuts. `make test` and `make demo` are the README's two commands: each installs what it
# needs (idempotently) and then runs.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
TORCH_VERSION = 2.13.0
CC ?= cc
NVCC ?= nvcc
SANITIZE = -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
CFLAGS_TEST = -std=c11 -O1 -g -Wall -Wextra -Wpedantic -Werror -Icsrc
CORE_SRC = $(wildcard csrc/core/*.c)
CORE_HDR = $(wildcard csrc/core/*.h)
BUILD_DIR = tests/c/build
C_TESTS = $(patsubst tests/c/%.c,$(BUILD_DIR)/%,$(wildcard tests/c/test_*.c))
CUDA_ARCHS = -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

.PHONY: setup test pytest ctest cuda-check demo bench clean

# Installs torch (CPU build), the build/test tools and softmoe itself (editable). The stamp makes a
# re-run free unless a source file changed.
setup: .stamp-install
.stamp-install: setup.py pyproject.toml csrc/bindings.cpp $(CORE_SRC) $(CORE_HDR) $(wildcard csrc/cuda/*)
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q "setuptools>=64" wheel ninja pytest numpy hypothesis tqdm matplotlib
	$(PIP) install -q --no-deps entmax
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

test: setup ctest
	$(PYTHON) -m pytest -q tests

pytest: setup
	$(PYTHON) -m pytest -q tests

# The C core alone, as strict C11, under AddressSanitizer and UndefinedBehaviorSanitizer.
ctest: $(C_TESTS)
	@for t in $(C_TESTS); do echo "== $$t"; ASAN_OPTIONS=detect_leaks=1 $$t || exit 1; done

$(BUILD_DIR)/%: tests/c/%.c $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD_DIR)
	$(CC) $(CFLAGS_TEST) $(SANITIZE) $< $(CORE_SRC) -lm -o $@

# Compile-only check of every CUDA file for sm_80 and sm_90 (needs nvcc, not torch, not a GPU).
cuda-check:
	@for f in csrc/cuda/*.cu; do echo "nvcc $$f"; \
	  $(NVCC) -std=c++17 -Icsrc -Xcompiler -Wall,-Wextra --Werror all-warnings $(CUDA_ARCHS) -c $$f -o /dev/null || exit 1; done

# The README demo: trains a small SoftMoE LM on the bundled text (about 3 minutes on 2 cores).
demo: setup
	$(PYTHON) examples/train_lm.py

bench: setup
	$(PYTHON) benchmarks/bench_router.py

clean:
	rm -rf build $(BUILD_DIR) softmoe/*.so .stamp-install *.egg-info
