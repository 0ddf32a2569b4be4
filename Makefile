# Shortcuts. `make test` and `make demo` are the README's two commands: each installs what it
# needs (idempotently) and then runs.
#
# The interpreter: PYTHON if given on the command line (a virtual environment's python); else the
# active virtual environment's ($VIRTUAL_ENV); else the project's own .venv, which the set-up creates
# with BASE_PYTHON. Everything is installed into that environment, never into a system Python
# (Debian's and Ubuntu's refuse `pip install` there: PEP 668, "externally-managed-environment").
# A PYTHON or VENV in the environment is not taken: CI systems export such names for their own uses.
BASE_PYTHON ?= python3
ifneq ($(origin VENV),command line)
VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
endif
ifneq ($(origin PYTHON),command line)
PYTHON := $(VENV)/bin/python
endif
PIP = $(PYTHON) -m pip
# The torch that pyproject.toml builds against (one place to change it).
TORCH_VERSION := $(shell sed -n 's/^requires = .*"torch==\([^"]*\)".*/\1/p' pyproject.toml)
# The environment PYTHON runs in (its sys.prefix; "-" outside a virtual environment, empty while .venv
# does not exist yet). The set-up stamp lives there, so it belongs to that interpreter: a new or
# another environment gets its own set-up. Its name holds a checksum of this checkout's path, so
# that two checkouts sharing one environment each install themselves.
PYTHON_ENV := $(shell $(PYTHON) -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "-")' 2>/dev/null)
STAMP := $(if $(PYTHON_ENV),$(PYTHON_ENV),$(VENV))/softmoe-setup-$(firstword $(shell echo '$(CURDIR)' | cksum)).stamp
CC ?= cc
NVCC ?= nvcc
SANITIZE = -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
# Debug line tables for the sanitizers' reports, no variable tracking: GCC's tracking of the soft
# top-k's large flattened row loops (lapsum_<isa>.c) took two thirds of their compile under the
# sanitizers (197 s, 69 s without).
DEBUG_INFO = -g -fno-var-tracking
CFLAGS_TEST = -std=c11 -O1 $(DEBUG_INFO) -Wall -Wextra -Wpedantic -Werror -Icsrc
CORE_SRC = $(wildcard csrc/core/*.c)
CORE_HDR = $(wildcard csrc/core/*.h)
BUILD_DIR = tests/c/build
C_TESTS = $(patsubst tests/c/%.c,$(BUILD_DIR)/%,$(wildcard tests/c/test_*.c))
# the kernels' timing binary (bench-core below); defined here, before the rules that name it
BENCH_CORE = $(BUILD_DIR)/bench_core
# CHECK, allocation and plan buffers shared by the C tests and the fuzz targets
TEST_HARNESS = tests/c/harness.h
CUDA_ARCHS = -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

.PHONY: setup test pytest ctest cuda-check cuda-build demo bench bench-core clean

# Installs torch, the build/test tools and softmoe itself (editable, built against that torch) into
# the environment. The stamp makes a re-run free unless a source file changed.
CSRC = $(shell find csrc -type f \( -name '*.c' -o -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' \))
setup: $(STAMP)
$(STAMP): setup.py pyproject.toml $(CSRC) | $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)
	@test "$(PYTHON_ENV)" != "-" || { echo "make: $(PYTHON) is not a virtual environment's python, and make installs"\
	  "packages: leave PYTHON unset (make creates .venv) or give a venv's python"; exit 1; }
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q "setuptools>=77" ninja pytest numpy hypothesis tqdm matplotlib "transformers==5.23.0" "peft==0.21.2"
	$(PIP) install -q --no-deps entmax
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

# The project's virtual environment (a failed attempt leaves nothing behind: Debian needs python3-venv).
$(VENV)/bin/python:
	$(BASE_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "make: could not create $(VENV) with $(BASE_PYTHON)"\
	  "(on Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }

# -rs: pytest prints the reason of every skipped test (no GPU, no valgrind, ...).
PYTEST = $(PYTHON) -m pytest -q -rs

# The fuzz smoke needs clang with libFuzzer (.ci/run installs it); without it `make test` says so and
# goes on, unless REQUIRE_FUZZ=1 (CI), where a missing clang is an error.
# (pytest runs the corpus replays that ctest has just built rather than compiling them again)
test: setup ctest fuzz-smoke-if-clang
	SOFTMOE_FUZZ_REPLAY_DIR=$(abspath $(FUZZ_BUILD)) $(PYTEST) tests

.PHONY: fuzz-smoke-if-clang
fuzz-smoke-if-clang:
	@if command -v $(FUZZ_CC) >/dev/null; then $(MAKE) --no-print-directory fuzz-smoke; \
	elif [ "$(REQUIRE_FUZZ)" = 1 ]; then echo "fuzz smoke: $(FUZZ_CC) not found (apt-get install clang libclang-rt-14-dev)"; exit 1; \
	else echo "fuzz smoke skipped: $(FUZZ_CC) not found (apt-get install clang libclang-rt-14-dev)"; fi

pytest: setup
	$(PYTEST) tests

# The C core alone, as strict C11, under AddressSanitizer and UndefinedBehaviorSanitizer. The binaries
# are built first, JOBS compiles at a time (the core's files, its instruction sets' row loops above
# all, compile at once), then run.
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
ctest:
	@$(MAKE) --no-print-directory -j$(JOBS) $(C_TESTS) $(BUILD_DIR)/test_lapsum_cxx \
	  $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/replay_%) $(BENCH_CORE)
	@$(MAKE) --no-print-directory fuzz-regress
	@for t in $(C_TESTS); do echo "== $$t"; ASAN_OPTIONS=detect_leaks=1 $$t || exit 1; done
	@echo "== $(BUILD_DIR)/test_lapsum_cxx (the core as the extension compiles it)"; $(BUILD_DIR)/test_lapsum_cxx
	$(BENCH_CORE) -e 4,8,64 -n 999 -r 1 && $(BENCH_CORE) -e 8 -n 999 -r 1 -s 4 -p

# The core under the sanitizers, compiled once for every C test and corpus replay (the row loops'
# three instruction-set files take a minute each).
CORE_SAN_OBJ = $(patsubst csrc/core/%.c,$(BUILD_DIR)/core-san/%.o,$(CORE_SRC))
$(BUILD_DIR)/core-san/%.o: csrc/core/%.c $(CORE_HDR)
	@mkdir -p $(BUILD_DIR)/core-san
	$(CC) $(CFLAGS_TEST) $(SANITIZE) -c $< -o $@

# (kept between runs: make would delete them as intermediates of the pattern rules)
.SECONDARY: $(CORE_SAN_OBJ)
$(BUILD_DIR)/%: tests/c/%.c $(TEST_HARNESS) $(CORE_SAN_OBJ) $(CORE_HDR)
	$(CC) $(CFLAGS_TEST) $(SANITIZE) $< $(CORE_SAN_OBJ) -lm -o $@

# Compile-only check of every CUDA file for sm_80 and sm_90 (needs nvcc, not torch, not a GPU), then a
# syntax check of the binding's CUDA implementations (csrc/torch/*_cuda.cpp, host C++) with nvcc
# against the installed torch's headers: a CPU build of torch ships them all but one generated header,
# which C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips (it only sets an export macro for Windows DLLs).
TORCH_INCLUDES = $(shell $(PYTHON) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem ' + p for p in include_paths()))")
cuda-check:
	@for f in csrc/cuda/*.cu; do echo "nvcc $$f"; \
	  $(NVCC) -std=c++17 -Icsrc -Xcompiler -Wall,-Wextra --Werror all-warnings $(CUDA_ARCHS) -c $$f -o /dev/null || exit 1; done
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "cuda-check: the binding's check needs torch in $(PYTHON)"; exit 1; }
	@for f in csrc/torch/*_cuda.cpp; do echo "nvcc (syntax) $$f"; \
	  $(NVCC) -std=c++17 -Icsrc $(TORCH_INCLUDES) -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
	    -Xcompiler -Wall,-Wextra,-fsyntax-only --Werror all-warnings -c $$f -o /dev/null || exit 1; done

# ==== The real CUDA extension, built and imported without a GPU (CI) ==========================
# `make cuda-build` installs the CUDA build of torch (PyPI's, with its nvidia-* wheels) into its own
# environment CUDA_VENV (once: a stamp keeps it), builds softmoe there with SOFTMOE_CUDA=1 for sm_80
# and sm_90, warnings in softmoe's own files as errors, from a copy of this checkout's files (git's
# tracked and unignored ones, mtimes kept, so an unchanged file is not recompiled and the CPU build in
# softmoe/ is left alone), checks that it imports without a GPU with a CUDA kernel for every op, and
# runs CUDA_BUILD_TESTS with that build. The build stamp makes a re-run only repeat the tests.
# CUDA_VENV_PIP: the CUDA torch comes from PyPI itself, whatever index or find-links pip is set up with,
# and its ~3 GB of wheels are not kept in pip's cache (disk, not time, is what CI runs short of).
# CUDA_VENV may be an absolute path (.ci/run puts it in a temporary directory).
CUDA_VENV ?= .venv-cuda
CUDA_SRC = build/cuda-src
CUDA_VENV_PIP = env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
  $(CUDA_VENV)/bin/python -m pip --no-cache-dir
CUDA_TORCH_STAMP = $(CUDA_VENV)/softmoe-cuda-torch-$(TORCH_VERSION).stamp
CUDA_BUILD_STAMP = $(CUDA_VENV)/softmoe-cuda-build-$(firstword $(shell echo '$(CURDIR)' | cksum)).stamp
CUDA_ARCH_LIST = 8.0;9.0
CUDA_JOBS ?= 2
CUDA_BUILD_TESTS = tests/test_cuda_build.py tests/test_fake_devices.py tests/test_cuda.py \
  tests/test_cuda_experts.py tests/test_experts.py tests/test_dispatch.py

# The packages are resolved first (pip's report, from the index's metadata, without the wheels), then
# installed one at a time at the resolved versions: one pip install of all of them would keep every
# downloaded wheel (about 3 GB) on the disk next to what they unpack to (about 5 GB) until the end.
CUDA_REQUIREMENTS = torch==$(TORCH_VERSION) "setuptools>=77" ninja pytest numpy hypothesis
$(CUDA_TORCH_STAMP):
	$(BASE_PYTHON) -m venv $(CUDA_VENV) || { rm -rf $(CUDA_VENV); echo "make: could not create $(CUDA_VENV)"; exit 1; }
	$(CUDA_VENV_PIP) install -q --dry-run --report $(CUDA_VENV)/resolved.json $(CUDA_REQUIREMENTS)
	$(CUDA_VENV)/bin/python -c 'import json, sys; [print(p["metadata"]["name"] + "==" + p["metadata"]["version"])\
	  for p in json.load(open(sys.argv[1]))["install"]]' $(CUDA_VENV)/resolved.json > $(CUDA_VENV)/resolved.txt
	while read -r pin; do $(CUDA_VENV_PIP) install -q --no-deps "$$pin" || exit 1; done < $(CUDA_VENV)/resolved.txt
	$(CUDA_VENV_PIP) check
	@touch $@

# The copy is refreshed on every run (tar keeps the files' mtimes); the build runs when a source,
# setup.py or pyproject.toml changed since the copy that the last build compiled (the stamp takes
# the copy's time, so an edit made while a build runs is built the next time).
cuda-build: $(CUDA_TORCH_STAMP)
	@mkdir -p $(CUDA_SRC)
	@touch $(CUDA_SRC)/.copy-time
	@git ls-files -z --cached --others --exclude-standard | xargs -0 sh -c 'for f; do [ -e "$$f" ] && printf "%s\0" "$$f"; done' _ \
	  | tar --null -T - -cf - | tar -xf - -C $(CUDA_SRC)
	@$(MAKE) --no-print-directory $(CUDA_BUILD_STAMP)
	cd $(CUDA_SRC) && $(abspath $(CUDA_VENV))/bin/python -m pytest -q -rs -p no:cacheprovider $(CUDA_BUILD_TESTS)

$(CUDA_BUILD_STAMP): $(CUDA_TORCH_STAMP) setup.py pyproject.toml $(CSRC)
	cd $(CUDA_SRC) && SOFTMOE_CUDA=1 SOFTMOE_WERROR=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCH_LIST)" MAX_JOBS=$(CUDA_JOBS) \
	  nice -n 10 $(abspath $(CUDA_VENV))/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	@touch -r $(CUDA_SRC)/.copy-time $@

# The README demo: trains a small SoftMoE LM on the bundled text (under 4 minutes on 2 cores).
# DEMO_ARGS: options of examples/train_lm.py (e.g. DEMO_ARGS="--steps 50" for a short run).
demo: setup
	$(PYTHON) examples/train_lm.py $(DEMO_ARGS)

bench: setup
	$(PYTHON) benchmarks/bench_router.py

# The C core compiled as the extension compiles it: as C++17, -O3, OpenMP. The same source
# vectorises differently as C and as C++, so the kernels' benchmark times these objects (the code
# that ships) and test_lapsum also runs against them (test_lapsum_cxx in ctest: their bits against
# the per-row functions compiled as C).
CORE_CXX_OBJ = $(patsubst csrc/core/%.c,$(BUILD_DIR)/core-cxx/%.o,$(CORE_SRC))
$(BUILD_DIR)/core-cxx/%.o: csrc/core/%.c $(CORE_HDR)
	@mkdir -p $(BUILD_DIR)/core-cxx
	$(CXX) -x c++ -std=c++17 -O3 -fopenmp -Wall -Wextra -Wno-missing-field-initializers -Werror -Icsrc -c $< -o $@

$(BUILD_DIR)/test_lapsum_cxx: tests/c/test_lapsum.c $(TEST_HARNESS) $(CORE_CXX_OBJ) $(CORE_HDR)
	$(CC) -std=c11 -O1 -g -Wall -Wextra -Wpedantic -Werror -Icsrc $< $(CORE_CXX_OBJ) -lm -o $@

# The soft top-k kernels timed alone, no torch (benchmarks/bench_core.c), on the C++ objects above.
# `make ctest` builds it and runs it once on a few rows so it cannot rot.
BENCH_CORE_ARGS ?=
bench-core: $(BENCH_CORE)
	$(BENCH_CORE) $(BENCH_CORE_ARGS)

$(BENCH_CORE): benchmarks/bench_core.c $(CORE_CXX_OBJ) $(CORE_HDR)
	$(CC) -std=c11 -O3 -fopenmp -Wall -Wextra -Wpedantic -Werror -Icsrc $< $(CORE_CXX_OBJ) -lm -o $@

clean:
	rm -rf build $(BUILD_DIR) softmoe/*.so $(STAMP) $(CUDA_BUILD_STAMP) *.egg-info

# ==== Fuzzing the C core (tests/fuzz/README.md) ===============================================
# `make fuzz` runs each libFuzzer target for FUZZ_SECONDS (needs clang with libFuzzer: on Debian
# `apt-get install clang libclang-rt-14-dev`); `make fuzz-smoke` replays the corpus and then fuzzes
# each target for FUZZ_SMOKE_RUNS_<target> inputs from the fixed FUZZ_SMOKE_SEED, capped at FUZZ_SMOKE_SECONDS
# (CI); `make fuzz-regress` replays the committed corpus through the same targets built with $(CC)
# and ASan/UBSan but without libFuzzer (part of `make ctest`).
# The smoke is seeded so that CI replays the exact inputs a developer's `make fuzz-smoke` checked (a
# slower machine stops at the time cap, inside the same sequence): exploring new inputs is `make
# fuzz`'s job (FUZZ_SEED unset: libFuzzer picks a seed and prints it), and a CI run must not fail on
# an input nobody has seen.
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 300
FUZZ_SMOKE_SECONDS ?= 60
FUZZ_SMOKE_SEED ?= 1
FUZZ_SMOKE_RUNS_fuzz_topk ?= 25000
FUZZ_SMOKE_RUNS_fuzz_dispatch ?= 2000
FUZZ_DIR = tests/fuzz
FUZZ_BUILD = $(FUZZ_DIR)/build
FUZZ_TARGETS = fuzz_topk fuzz_dispatch
FUZZ_DEPS = $(FUZZ_DIR)/fuzz_common.h $(TEST_HARNESS) $(CORE_SRC) $(CORE_HDR)
FUZZ_CFLAGS = -std=c11 -O1 $(DEBUG_INFO) -Wall -Wextra -Icsrc -fsanitize=fuzzer,address,undefined \
  -fno-sanitize-recover=all -fno-omit-frame-pointer
FUZZ_RUN_FLAGS = -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1

.PHONY: fuzz fuzz-smoke fuzz-regress fuzz-run

# The harness itself is built without comparison tracing (its checking loops would otherwise take
# half the time of every run and tell libFuzzer nothing about the core); the core keeps it.
# The core instrumented for libFuzzer, compiled once for both targets.
FUZZ_CORE_OBJ = $(patsubst csrc/core/%.c,$(FUZZ_BUILD)/core/%.o,$(CORE_SRC))
$(FUZZ_BUILD)/core/%.o: csrc/core/%.c $(CORE_HDR)
	@command -v $(FUZZ_CC) >/dev/null || { echo "fuzz: $(FUZZ_CC) not found; apt-get install clang libclang-rt-14-dev"; exit 1; }
	@mkdir -p $(FUZZ_BUILD)/core
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

.SECONDARY: $(FUZZ_CORE_OBJ)
$(FUZZ_BUILD)/libfuzzer_%: $(FUZZ_DIR)/%.c $(FUZZ_DEPS) $(FUZZ_CORE_OBJ)
	@mkdir -p $(FUZZ_BUILD)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fno-sanitize-coverage=trace-cmp -c $< -o $@.o
	$(FUZZ_CC) $(FUZZ_CFLAGS) $@.o $(FUZZ_CORE_OBJ) -lm -o $@

$(FUZZ_BUILD)/replay_%: $(FUZZ_DIR)/%.c $(FUZZ_DIR)/replay_main.c $(FUZZ_DEPS) $(CORE_SAN_OBJ)
	@mkdir -p $(FUZZ_BUILD)
	$(CC) $(CFLAGS_TEST) $(SANITIZE) $< $(FUZZ_DIR)/replay_main.c $(CORE_SAN_OBJ) -lm -o $@

fuzz-regress: $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/replay_%)
	@for t in $(FUZZ_TARGETS); do echo "== corpus of $$t"; \
	  ASAN_OPTIONS=detect_leaks=1 $(FUZZ_BUILD)/replay_$$t $(FUZZ_DIR)/corpus/$$t || exit 1; done

# New inputs go to $(FUZZ_WORK)/<target>, crashes to $(FUZZ_BUILD)/crashes/<target>-*; the
# committed corpus is only read. Keep a crasher by copying it into tests/fuzz/corpus/<target>/.
# libFuzzer first replays its whole working corpus, which -max_total_time does not bound: the smoke
# run therefore starts from an empty working directory (only the committed corpus to replay).
FUZZ_WORK ?= $(FUZZ_BUILD)/work
fuzz-run:
	@$(MAKE) --no-print-directory -j$(JOBS) $(FUZZ_TARGETS:%=$(FUZZ_BUILD)/libfuzzer_%)
	@$(foreach t,$(FUZZ_TARGETS),echo "== $(t) for at most $(FUZZ_RUN_SECONDS) s"; \
	  mkdir -p $(FUZZ_WORK)/$(t) $(FUZZ_BUILD)/crashes; \
	  $(FUZZ_BUILD)/libfuzzer_$(t) $(FUZZ_RUN_FLAGS) -max_total_time=$(FUZZ_RUN_SECONDS) \
	    $(if $(FUZZ_SEED),-seed=$(FUZZ_SEED)) $(if $(FUZZ_RUNS_LIMITED),-runs=$(FUZZ_SMOKE_RUNS_$(t))) \
	    -artifact_prefix=$(FUZZ_BUILD)/crashes/$(t)- $(FUZZ_WORK)/$(t) $(FUZZ_DIR)/corpus/$(t) || exit 1;)

fuzz:
	@$(MAKE) --no-print-directory fuzz-run FUZZ_RUN_SECONDS=$(FUZZ_SECONDS)

fuzz-smoke: fuzz-regress
	@test $(FUZZ_SMOKE_SECONDS) -le 60 || { echo "fuzz-smoke: FUZZ_SMOKE_SECONDS must be <= 60"; exit 1; }
	@rm -rf $(FUZZ_BUILD)/smoke
	@$(MAKE) --no-print-directory fuzz-run FUZZ_RUN_SECONDS=$(FUZZ_SMOKE_SECONDS) FUZZ_WORK=$(FUZZ_BUILD)/smoke \
	  FUZZ_SEED=$(FUZZ_SMOKE_SEED) FUZZ_RUNS_LIMITED=1

# ==== Memory errors of the extension under valgrind (tests/memcheck/run.py) ===================
# A short SoftMoE training loop and every compiled op, forward and backward, under valgrind
# memcheck; fails on an invalid access, a use of uninitialised memory or a definitely-lost block
# whose stack passes through softmoe's extension (CPython's and torch's own reports are counted and
# ignored: see the script). Needs `apt-get install valgrind`; ~3 CPU-minutes.
.PHONY: memcheck
memcheck: setup
	$(PYTHON) tests/memcheck/run.py
