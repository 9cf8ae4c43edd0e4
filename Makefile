# llama2zh: `make demo` runs the whole pipeline, `make test` checks it.
CC      ?= gcc
PYTHON  ?= python3
TORCH   ?= torch==2.13.0
VENV    := .venv
VPY     := $(VENV)/bin/python

ENGINE_SRC := csrc/model.c csrc/tokenizer.c csrc/sampler.c csrc/generate.c
ENGINE_HDR := csrc/llama2.h csrc/common.h
CFLAGS  ?= -O3
WARN    := -std=gnu11 -Wall -Wextra -Wno-unused-parameter
OMP     := -fopenmp
# -march=native only where the compiler takes it; `make runportable` never uses it.
NATIVE  := $(shell $(CC) -march=native -x c -c /dev/null -o /dev/null 2>/dev/null && echo -march=native)

.PHONY: run runportable lib venv test bench clean

run: csrc/run.c $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(CFLAGS) $(NATIVE) $(OMP) $(WARN) -o run csrc/run.c $(ENGINE_SRC) -lm

# Runs on any x86-64 / arm64 machine of the same OS: no CPU-specific instructions.
runportable: csrc/run.c $(ENGINE_SRC) $(ENGINE_HDR)
	$(CC) $(CFLAGS) $(OMP) $(WARN) -o run csrc/run.c $(ENGINE_SRC) -lm

lib: build/libllama2zh.so

build/libllama2zh.so: $(ENGINE_SRC) $(ENGINE_HDR)
	@mkdir -p build
	$(CC) $(CFLAGS) $(NATIVE) $(OMP) $(WARN) -fPIC -shared -o $@ $(ENGINE_SRC) -lm

# The virtualenv is rebuilt when pyproject.toml changes. TORCH pins the CPU build by default.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $@

test: venv run lib
	$(VPY) -m pytest -q tests

clean:
	rm -rf build run

bench: venv run
	$(VPY) -m llama2zh.bench
