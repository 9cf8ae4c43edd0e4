# llama2zh: `make demo` runs the whole pipeline, `make test` checks it.
CC      ?= gcc
PYTHON  ?= python3
TORCH   ?= torch==2.13.0
VENV    := .venv
VPY     := $(VENV)/bin/python

ENGINE_SRC := csrc/model.c csrc/quant.c csrc/quant4.c csrc/tokenizer.c csrc/sampler.c csrc/generate.c
ENGINE_HDR := csrc/llama2.h csrc/common.h csrc/quant.h csrc/quant4.h
# the build products are rebuilt when their flags here change too
ENGINE_DEPS := $(ENGINE_SRC) $(ENGINE_HDR) Makefile
CFLAGS  ?= -O3
WARN    := -std=gnu11 -Wall -Wextra -Wno-unused-parameter
OMP     := -fopenmp
# -march=native only where the compiler takes it; `make runportable` never uses it.
NATIVE  := $(shell $(CC) -march=native -x c -c /dev/null -o /dev/null 2>/dev/null && echo -march=native)
# nodelete: the library stays mapped after dlclose (Python unloads it at exit), because
# OpenMP's idle worker threads may still be running its code; unmapping it under them crashes.
SHARED  := -fPIC -shared -Wl,-z,nodelete

.PHONY: run runportable lib venv test test-asan fuzz bench gpu-check demo demo-align clean interop-table

run: csrc/run.c $(ENGINE_DEPS)
	$(CC) $(CFLAGS) $(NATIVE) $(OMP) $(WARN) -o run csrc/run.c $(ENGINE_SRC) -lm

# Runs on any x86-64 / arm64 machine of the same OS: no CPU-specific instructions.
runportable: csrc/run.c $(ENGINE_DEPS)
	$(CC) $(CFLAGS) $(OMP) $(WARN) -o run csrc/run.c $(ENGINE_SRC) -lm

lib: build/libllama2zh.so

build/libllama2zh.so: $(ENGINE_DEPS)
	@mkdir -p build
	$(CC) $(CFLAGS) $(NATIVE) $(OMP) $(WARN) $(SHARED) -o $@ $(ENGINE_SRC) -lm

# The virtualenv is rebuilt when pyproject.toml changes. TORCH pins the CPU build by default.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet "$(TORCH)" -e ".[dev,plot]"
	touch $@

test: venv run lib
	$(VPY) -m pytest -q tests

# The whole pipeline, offline, on the built-in corpus. Each step is a file target, so a second
# `make demo` (or one after an interruption) redoes only what is missing; training resumes.
LLAMA2ZH := $(VPY) -m llama2zh
PROMPT   ?= 从前，有一个小女孩

data/sample/.complete: | venv
	$(LLAMA2ZH) download sample
	touch $@

tokenizers/sample/tokenizer.model: data/sample/.complete
	$(LLAMA2ZH) vocab train --input data/sample/data*.json --vocab-size 4096 --out tokenizers/sample

data/sample/sample/manifest.json: tokenizers/sample/tokenizer.model
	$(LLAMA2ZH) pretokenize data/sample --tokenizer tokenizers/sample

out/sample/model.bin: data/sample/sample/manifest.json configs/sample.toml
	$(LLAMA2ZH) train --config configs/sample.toml
	$(LLAMA2ZH) export out/sample

# Then the chat stage: instruction tuning on the built-in conversations, and a chat through a pipe.
CHAT_1   ?= 给我讲一个小女孩莉莉在公园里的故事。
CHAT_2   ?= 把它翻译成英文。

data/sample-sft/.complete: | venv
	$(LLAMA2ZH) download sample-sft
	touch $@

out/sample-sft/model.bin: out/sample/model.bin data/sample-sft/.complete configs/sample_sft.toml
	$(LLAMA2ZH) sft --config configs/sample_sft.toml

demo: venv run lib out/sample/model.bin out/sample-sft/model.bin
	$(LLAMA2ZH) eval out/sample
	./run out/sample/model.bin -k out/sample/tokenizer.bin -i "$(PROMPT)" -t 0.8 -p 0.9 -s 42 -n 256
	$(LLAMA2ZH) verify out/sample
	printf '%s\n%s\n' "$(CHAT_1)" "$(CHAT_2)" | ./run out/sample-sft/model.bin -k out/sample-sft/tokenizer.bin -m chat -t 0
	$(LLAMA2ZH) verify out/sample-sft

# Alignment, after `make demo`'s chat run: DPO on the built-in preference pairs (out/sample-sft is
# the start and the frozen reference), both runs evaluated side by side, and the same chat again.
data/sample-dpo/.complete: | venv
	$(LLAMA2ZH) download sample-dpo
	touch $@

out/sample-dpo/model.bin: out/sample-sft/model.bin data/sample-dpo/.complete configs/sample_dpo.toml
	$(LLAMA2ZH) dpo --config configs/sample_dpo.toml

demo-align: venv run lib out/sample-dpo/model.bin
	$(LLAMA2ZH) eval out/sample-dpo
	printf '%s\n%s\n' "$(CHAT_1)" "$(CHAT_2)" | ./run out/sample-dpo/model.bin -k out/sample-dpo/tokenizer.bin -m chat -t 0

# The README's interop table: each export loaded by transformers, llama.cpp and ./run, measured
# (needs the demo's out/sample-sft; builds llama.cpp once, like the tests).
interop-table: venv run lib
	$(VPY) -m tests.interop_table

clean:
	rm -rf build run

# The C-facing tests against a build with AddressSanitizer and UBSan: the binding loads
# LLAMA2ZH_LIB and runs LLAMA2ZH_RUN. The Python process needs libasan preloaded (and libstdc++,
# for its C++ extensions' exceptions); its own leaks are not the engine's (make fuzz checks those).
ASAN_FLAGS := -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
ASAN_TESTS := tests/test_run.py tests/test_parity.py tests/test_tokenizer.py tests/test_quant.py tests/test_chat_engine.py \
              tests/test_interop_llama2c.py tests/test_batch.py tests/test_quant4.py

build/asan/libllama2zh.so: $(ENGINE_DEPS)
	@mkdir -p build/asan
	$(CC) $(ASAN_FLAGS) $(OMP) $(WARN) $(SHARED) -o $@ $(ENGINE_SRC) -lm

build/asan/run: csrc/run.c $(ENGINE_DEPS)
	@mkdir -p build/asan
	$(CC) $(ASAN_FLAGS) $(OMP) $(WARN) -o $@ csrc/run.c $(ENGINE_SRC) -lm

test-asan: venv build/asan/libllama2zh.so build/asan/run
	LLAMA2ZH_LIB=$(CURDIR)/build/asan/libllama2zh.so LLAMA2ZH_RUN=$(CURDIR)/build/asan/run \
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 $(VPY) -m pytest -q $(ASAN_TESTS)

# libFuzzer on the model.bin and tokenizer.bin loaders, under AddressSanitizer and UBSan
# (leaks included), from seeds of every file kind; FUZZ_TIME seconds (needs clang).
FUZZ_CC   ?= clang
FUZZ_TIME ?= 60

build/fuzz/fuzz_loaders: csrc/fuzz_loaders.c $(ENGINE_DEPS)
	@mkdir -p build/fuzz
	@command -v $(FUZZ_CC) >/dev/null || { echo "make fuzz needs clang (apt-get install clang)"; exit 1; }
	$(FUZZ_CC) -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
		-fopenmp-simd -Wno-pass-failed $(WARN) -o $@ csrc/fuzz_loaders.c $(ENGINE_SRC) -lm

build/fuzz/seeds/.done: csrc/fuzz_seeds.py | venv
	$(VPY) csrc/fuzz_seeds.py build/fuzz/seeds
	touch $@

fuzz: build/fuzz/fuzz_loaders build/fuzz/seeds/.done
	@mkdir -p build/fuzz/corpus
	build/fuzz/fuzz_loaders -max_total_time=$(FUZZ_TIME) -max_len=8192 -timeout=10 -rss_limit_mb=4096 \
		-print_final_stats=1 -artifact_prefix=build/fuzz/ build/fuzz/corpus build/fuzz/seeds

# The training loop on a CUDA GPU: tokens/s, MFU and peak memory of the 15M, 42M and 110M shapes on
# random tokens (needs a CUDA build of torch in .venv; says so and exits 1 without a GPU).
gpu-check: venv
	$(VPY) -m llama2zh.gpu_check

# Speed, each figure a ratio against a baseline measured in the same run (this machine is noisy).
bench: venv run lib
	$(VPY) -m llama2zh.bench.decode
	$(VPY) -m llama2zh.bench.train
	$(VPY) -m llama2zh.bench.pretokenize
	$(VPY) -m llama2zh.bench.translate
	$(VPY) -m llama2zh.bench.serve
	$(VPY) -m llama2zh.bench.corpus
	$(VPY) -m llama2zh.bench.tokenizer
