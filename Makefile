# strata - build, test and run.
#
#   make                      strata-server and strata-worker in build/
#   make SANITIZER=address    the same tree with ASan, in build-address/
#   make SANITIZER=undefined  the same tree with UBSan, in build-undefined/
#   make test                 unit tests, then integration tests (private PostgreSQL)
#   make demo                 starts the stack and runs the demo jobs
#   make up / make down       start / stop the local stack (writes var/env)

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
WORKER_SRC := $(filter-out worker/main.c,$(sort $(wildcard worker/*.c worker/engine/*.c)))
TEST_SRC   := $(sort $(wildcard tests/unit/test_*.c))

obj = $(patsubst %.c,$(BUILD)/obj/%.o,$(1))
COMMON_OBJ := $(call obj,$(COMMON_SRC))
SERVER_OBJ := $(call obj,$(SERVER_SRC))
WORKER_OBJ := $(call obj,$(WORKER_SRC))
TEST_BIN   := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(TEST_SRC))

SERVER := $(BUILD)/strata-server
WORKER := $(BUILD)/strata-worker

.PHONY: all deps test unit integration demo up down clean bench
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
$(WORKER): $(call obj,worker/main.c) $(BUILD)/libworker.a $(BUILD)/libcommon.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# Each unit test links the libraries of the program it tests (test_server_*
# the server's, the others the worker's); cmocka runs its cases isolated.
$(BUILD)/tests/test_server_%: $(call obj,tests/unit/test_server_%.c) $(BUILD)/libserver.a $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) -lcmocka
$(BUILD)/tests/test_%: $(call obj,tests/unit/test_%.c) $(BUILD)/libworker.a $(BUILD)/libcommon.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) -lcmocka

unit: $(TEST_BIN)
	@set -e; for t in $(TEST_BIN); do echo "== $$t"; $$t; done

integration: all
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

bench: all
	BUILD=$(BUILD) bench/run.sh

clean:
	rm -rf build build-address build-undefined

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
