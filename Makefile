# Hearth entry points. `make images` builds the base and runtime images (no registry needed),
# `make test` runs everything CI runs, `make bench` prints the benchmark numbers.
SHELL := /bin/bash
CARGO ?= cargo
RUNTIME_IMAGES := node python

.PHONY: images base $(RUNTIME_IMAGES) hello test lint bench clean-test

images: base $(RUNTIME_IMAGES)

base:
	bash runtimes/base/build.sh

node: base
	docker build -q -t hearth/node:v5-18 -f runtimes/node/Dockerfile runtimes

python: base
	docker build -q -t hearth/python:v5-3.11 -f runtimes/python/Dockerfile runtimes

# Build the images, build the Node example with the image's build step, run it, call it once.
hello: images
	bash runtimes/hello.sh node

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: images lint
	$(CARGO) test --workspace -- --nocapture

bench: images
	$(CARGO) run --release -q -p hearth-tests --bin bench -- $(BENCH_ARGS)

# Remove whatever a crashed test left behind (only what carries the test label).
clean-test:
	docker ps -aq --filter label=hearth.test=1 | xargs -r docker rm -f -v
