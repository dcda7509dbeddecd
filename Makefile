# strata - build, test and run.
#
#   make                      strata-server and strata-worker in build/
#   make SANITIZER=address    the same tree with ASan, in build-address/
#   make SANITIZER=undefined  the same tree with UBSan, in build-undefined/
#   make test                 unit tests, then integration tests (private PostgreSQL)
#   make demo                 starts the stack and runs the demo jobs
#   make up / make down       start / stop the local stack (writes var/env)
#   make status               what the local stack is running

SANITIZER ?=
BUILD     ?= build$(if $(SANITIZER),-$(SANITIZER))
CC        ?= cc
PKGS      := libmicrohttpd libpq jansson libcurl openblas libcrypto

CFLAGS  ?= -O2 -g
CFLAGS  += -std=c11 -D_GNU_SOURCE -pthread -Wall -Wextra -Werror -Wshadow -Wformat=2 \
           -Wstrict-prototypes -Wmissing-prototypes -fno-strict-aliasing \
           -I. $(shell pkg-config --cflags $(PKGS))
LDLIBS   = $(shell pkg-config --libs $(PKGS)) -lpthread -lm

ifneq ($(SANITIZER),)
CFLAGS  += -fsanitize=$(SANITIZER) -fno-omit-frame-pointer
LDFLAGS += -fsanitize=$(SANITIZER)
ifeq ($(SANITIZER),undefined)
CFLAGS  += -fno-sanitize-recover=undefined
endif
endif

COMMON_SRC := $(sort $(wildcard common/*.c))
SERVER_SRC := $(filter-out server/main.c,$(sort $(wildcard server/*.c)))
WORKER_SRC := $(filter-out worker/main.c,$(sort $(wildcard worker/*.c worker/engine/*.c))) \
              $(filter-out worker/engine/cuda/none%,$(sort $(wildcard worker/engine/cuda/*.c)))
TEST_SRC   := $(sort $(wildcard tests/unit/test_*.c))

obj = $(patsubst %.c,$(BUILD)/obj/%.o,$(1))
COMMON_OBJ := $(call obj,$(COMMON_SRC))
SERVER_OBJ := $(call obj,$(SERVER_SRC))
WORKER_OBJ := $(call obj,$(WORKER_SRC))
TEST_BIN   := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(TEST_SRC))

SERVER := $(BUILD)/strata-server
WORKER := $(BUILD)/strata-worker

# --- CUDA (worker/engine/cuda/, see compat.cuh) ------------------------------
# With nvcc (found at $(CUDA_HOME)/bin/nvcc or on PATH; NVCC= turns it off) the
# .cu files are compiled for sm_80 and sm_90 into build-cuda/ (host code built
# by nvcc is the same for every SANITIZER, so the builds share it) and the
# worker links cudart, cuBLAS and cublasLt; without it, none*.c stand in and
# the worker reports that it has no GPU support. The plain C files beside
# them (launch plans, precision names) are part of libworker either way. CUDA_LINK goes before the
# libraries on every link line of the worker and its tests.
# The emulated build of the same .cu files (g++ -DSTRATA_CUDA_EMU, with this
# build's sanitizer) runs every kernel on the CPU: tests/unit/test_cudaemu_*.c
# link it instead of the real thing, on every machine.
CUDA_HOME ?= /usr/local/cuda
NVCC      ?= $(firstword $(wildcard $(CUDA_HOME)/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
CUDA_BUILD ?= build-cuda
CUDA_SRC  := $(sort $(wildcard worker/engine/cuda/*.cu))
CUDA_ARCH ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
NVCCFLAGS ?= -O2 -g -lineinfo
NVCCFLAGS += -std=c++17 $(CUDA_ARCH) -I. --Werror all-warnings \
             -Xcompiler -Wall,-Wextra,-Werror,-fno-strict-aliasing,-pthread
ifneq ($(NVCC),)
CUDA_LINK := $(patsubst %.cu,$(CUDA_BUILD)/%.o,$(CUDA_SRC))
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcublas -lcudart -lstdc++
else
CUDA_LINK := $(call obj,$(sort $(wildcard worker/engine/cuda/none*.c)))
CUDA_LIBS :=
endif

$(CUDA_BUILD)/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -MMD -MP -c $< -o $@

EMU_CXX   ?= g++
EMU_FLAGS := -O1 -g -std=c++17 -DSTRATA_CUDA_EMU -D_GNU_SOURCE -pthread -Wall -Wextra -Werror \
             -fno-strict-aliasing -I. $(filter -fsanitize=% -fno-sanitize-recover=% -fno-omit-frame-pointer,$(CFLAGS))
EMU_SRC   := $(filter-out worker/engine/cuda/gemm.cu,$(CUDA_SRC)) $(sort $(wildcard tests/cuda_emu/*.cc))
EMU_LINK  := $(patsubst %,$(BUILD)/emu/%.o,$(EMU_SRC)) $(call obj,$(sort $(wildcard tests/cuda_emu/*.c)))
EMU_LIBS  := -lstdc++

$(BUILD)/emu/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_FLAGS) -x c++ -MMD -MP -c $< -o $@
$(BUILD)/emu/%.cc.o: %.cc
	@mkdir -p $(dir $@)
	$(EMU_CXX) $(EMU_FLAGS) -MMD -MP -c $< -o $@
# A real worker whose GPUs are emulated (STRATA_EMU_DEVICES of them, default
# 1): the integration tests run GPU jobs and the one-job-per-GPU slots through
# it on machines without a GPU.
$(BUILD)/strata-worker-emu: $(call obj,worker/main.c) $(EMU_LINK) $(BUILD)/libworker.a $(BUILD)/libcommon.a
	$(CC) $(LDFLAGS) -o $@ $^ $(EMU_LIBS) $(LDLIBS)

.PHONY: all deps test unit integration demo up down status clean bench
all: $(SERVER) $(WORKER)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libcommon.a: $(COMMON_OBJ)
	$(AR) rcs $@ $^
$(BUILD)/libserver.a: $(SERVER_OBJ)
	$(AR) rcs $@ $^
$(BUILD)/libworker.a: $(WORKER_OBJ)
	$(AR) rcs $@ $^

$(SERVER): $(call obj,server/main.c) $(BUILD)/libserver.a $(BUILD)/libcommon.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
$(WORKER): $(call obj,worker/main.c) $(CUDA_LINK) $(BUILD)/libworker.a $(BUILD)/libcommon.a
	$(CC) $(LDFLAGS) -o $@ $^ $(CUDA_LIBS) $(LDLIBS)

# Each unit test links the libraries of the program it tests (test_server_*
# the server's, the others the worker's) and tests/unit/testutil.c, the
# helpers the tests share (not a test: TEST_SRC globs test_*.c only); cmocka
# runs its cases isolated.
TESTUTIL_OBJ := $(call obj,tests/unit/testutil.c)
$(BUILD)/tests/test_server_%: $(call obj,tests/unit/test_server_%.c) $(TESTUTIL_OBJ) $(BUILD)/libserver.a $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) -lcmocka
$(BUILD)/tests/test_cudaemu_%: $(call obj,tests/unit/test_cudaemu_%.c) $(TESTUTIL_OBJ) $(EMU_LINK) $(BUILD)/libworker.a $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(EMU_LIBS) $(LDLIBS) -lcmocka
$(BUILD)/tests/test_%: $(call obj,tests/unit/test_%.c) $(TESTUTIL_OBJ) $(CUDA_LINK) $(BUILD)/libworker.a $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(CUDA_LIBS) $(LDLIBS) -lcmocka

# The emulated kernel-level tests again with the emulator's other schedules
# (tests/cuda_emu/README.md): blocks and threads in reverse, then in a
# seeded shuffled order (EMU_SEED; empty: the emulator's default), where a
# missing __syncthreads or a launch-order assumption shows. test_cudaemu_train
# (the same kernels through whole jobs, ~5 s a pass) is left out.
EMU_SEED ?=
EMU_SCHED_BIN := $(filter $(patsubst %,$(BUILD)/tests/test_cudaemu_%,\
                 emu kernels attention attn_gemm cka backend),$(TEST_BIN))
unit: $(TEST_BIN)
	@set -e; for t in $(TEST_BIN); do echo "== $$t"; $$t; done
	@set -e; for t in $(EMU_SCHED_BIN); do echo "== $$t (STRATA_EMU_SCHEDULE=reverse)"; \
	    STRATA_EMU_SCHEDULE=reverse $$t; done
	@set -e; for t in $(EMU_SCHED_BIN); do echo "== $$t (STRATA_EMU_SCHEDULE=shuffle)"; \
	    STRATA_EMU_SCHEDULE=shuffle STRATA_EMU_SEED=$(EMU_SEED) $$t; done

integration: all $(BUILD)/strata-worker-emu
	BUILD=$(BUILD) SANITIZER=$(SANITIZER) tests/integration/run.sh

# test, demo and up first install what is missing (a fresh Debian machine has
# none of the libraries), then build in a second make that sees them.
deps:
	deploy/install-deps.sh

test: deps
	$(MAKE) --no-print-directory all
	$(MAKE) --no-print-directory unit
	$(MAKE) --no-print-directory integration

demo: deps
	$(MAKE) --no-print-directory all
	BUILD=$(BUILD) deploy/demo.sh
up: deps
	$(MAKE) --no-print-directory all
	BUILD=$(BUILD) deploy/stack.sh up
down:
	BUILD=$(BUILD) deploy/stack.sh down
status:
	BUILD=$(BUILD) deploy/stack.sh status

bench: all
	BUILD=$(BUILD) bench/run.sh

clean:
	rm -rf build build-address build-undefined $(CUDA_BUILD)

# --- fuzz targets (tests/fuzz/, see its README) --------------------------------
# fuzz-replay: each tests/fuzz/fuzz_<t>.c linked by $(CC) with the replay driver
# into $(BUILD)/fuzz/ (so with this build's SANITIZER) and run over its committed
# corpus tests/fuzz/corpus/<t>/; `make unit` runs it first.
# fuzz: the same targets under clang's libFuzzer with ASan and UBSan in
# build/fuzz-clang/, each run for FUZZ_SECONDS; what they find goes to
# build/fuzz-work/<t>/ (crashes as build/fuzz-work/<t>-crash-*), never into the
# committed corpus.
FUZZ_NAMES      := $(patsubst tests/fuzz/fuzz_%.c,%,$(sort $(wildcard tests/fuzz/fuzz_*.c)))
FUZZ_REPLAY_BIN := $(patsubst %,$(BUILD)/fuzz/replay_%,$(FUZZ_NAMES))
FUZZ_SECONDS    ?= 60
FUZZ_CC         ?= clang-14
FUZZ_DIR        := build/fuzz-clang
FUZZ_WORK       := build/fuzz-work
FUZZ_CFLAGS     := -O1 -g -std=c11 -D_GNU_SOURCE -pthread -Wall -Wextra -Werror -Wshadow \
                   -Wformat=2 -Wstrict-prototypes -Wmissing-prototypes -fno-strict-aliasing \
                   -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
                   -fno-sanitize-recover=undefined -I. $(shell pkg-config --cflags $(PKGS))

.PHONY: fuzz-replay fuzz
# Kept: make would otherwise delete these objects as intermediates.
.SECONDARY: $(call obj,$(patsubst %,tests/fuzz/fuzz_%.c,$(FUZZ_NAMES)) tests/fuzz/replay.c)
unit: fuzz-replay

$(BUILD)/fuzz/replay_http: $(call obj,tests/fuzz/fuzz_http.c tests/fuzz/replay.c) $(BUILD)/libserver.a $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
$(BUILD)/fuzz/replay_tok: $(call obj,tests/fuzz/fuzz_tok.c tests/fuzz/replay.c worker/engine/tok.c) $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
$(BUILD)/fuzz/replay_dataset: $(call obj,tests/fuzz/fuzz_dataset.c tests/fuzz/replay.c worker/engine/dataset.c) $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
$(BUILD)/fuzz/replay_%: $(call obj,tests/fuzz/fuzz_%.c tests/fuzz/replay.c) $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

fuzz-replay: $(FUZZ_REPLAY_BIN)
	@set -e; for t in $(FUZZ_NAMES); do echo "== fuzz replay $$t"; \
	    $(BUILD)/fuzz/replay_$$t tests/fuzz/corpus/$$t; done

# clang compiles the sources straight into each fuzzer (no shared objects with
# the gcc builds); the http target needs the server's code, the others common/.
$(FUZZ_DIR)/fuzz_http: tests/fuzz/fuzz_http.c $(SERVER_SRC) $(COMMON_SRC)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ $^ $(LDLIBS)
$(FUZZ_DIR)/fuzz_tok: tests/fuzz/fuzz_tok.c worker/engine/tok.c $(COMMON_SRC)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ $^ $(LDLIBS)
$(FUZZ_DIR)/fuzz_dataset: tests/fuzz/fuzz_dataset.c worker/engine/dataset.c $(COMMON_SRC)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ $^ $(LDLIBS)
$(FUZZ_DIR)/fuzz_%: tests/fuzz/fuzz_%.c $(COMMON_SRC)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ $^ $(LDLIBS)

fuzz: $(patsubst %,$(FUZZ_DIR)/fuzz_%,$(FUZZ_NAMES))
	@set -e; for t in $(FUZZ_NAMES); do echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
	    mkdir -p $(FUZZ_WORK)/$$t; \
	    $(FUZZ_DIR)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	        -print_final_stats=1 -artifact_prefix=$(FUZZ_WORK)/$$t- \
	        $(FUZZ_WORK)/$$t tests/fuzz/corpus/$$t; done

-include $(shell find $(BUILD)/obj $(BUILD)/emu $(CUDA_BUILD) -name '*.d' 2>/dev/null)

# --- GPU test and bench (tests/gpu/, bench/gpu/; see their READMEs) ----------
# test-gpu: tests/gpu/test_gpu linked with the real CUDA objects: every backend
# op forward and backward against the CPU backend in fp32/bf16/fp16, the
# PyTorch reference fixtures, train, predict and CKA jobs on the GPU vs the
# CPU, then a table; exits 77 (make reports "Error 77") when no GPU is found.
# test-gpu-emu: the same program linked with the CUDA emulator
# (tests/cuda_emu/) on small shapes, on any machine: it proves the program
# before GPU time is spent. bench-gpu: bench/gpu/run.sh (a GPU, and PyTorch
# for the peer). --as-needed keeps the server's libraries (libpq,
# libmicrohttpd, libcurl) off these binaries, which tests/gpu/device.sh runs
# on machines that lack them.
GPU_TEST_OBJ   := $(call obj,tests/gpu/test_gpu.c tests/gpu/gpu_models.c)
GPU_BENCH_OBJ  := $(call obj,bench/gpu/bench_gpu.c)
GPU_LINK_FLAGS := -Wl,--as-needed

.PHONY: test-gpu test-gpu-emu bench-gpu
$(BUILD)/gpu/test_gpu: $(GPU_TEST_OBJ) $(CUDA_LINK) $(BUILD)/libworker.a $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $(GPU_LINK_FLAGS) -o $@ $^ $(CUDA_LIBS) $(LDLIBS)
$(BUILD)/gpu/test_gpu_emu: $(GPU_TEST_OBJ) $(EMU_LINK) $(BUILD)/libworker.a $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $(GPU_LINK_FLAGS) -o $@ $^ $(EMU_LIBS) $(LDLIBS)
$(BUILD)/gpu/bench_gpu: $(GPU_BENCH_OBJ) $(CUDA_LINK) $(BUILD)/libworker.a $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $(GPU_LINK_FLAGS) -o $@ $^ $(CUDA_LIBS) $(LDLIBS)
# bench_gpu on the emulator: `bench_gpu_emu train|predict --shape tiny` runs
# the bench's steps on the CPU (not a measurement) before GPU time is spent.
$(BUILD)/gpu/bench_gpu_emu: $(GPU_BENCH_OBJ) $(EMU_LINK) $(BUILD)/libworker.a $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) $(GPU_LINK_FLAGS) -o $@ $^ $(EMU_LIBS) $(LDLIBS)

test-gpu: $(BUILD)/gpu/test_gpu
	tests/gpu/run.sh $(BUILD)/gpu/test_gpu
test-gpu-emu: $(BUILD)/gpu/test_gpu_emu
	tests/gpu/run.sh $(BUILD)/gpu/test_gpu_emu --small
bench-gpu: $(BUILD)/gpu/bench_gpu
	BUILD=$(BUILD) bench/gpu/run.sh
