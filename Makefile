# Hearth entry points. `make images` builds the base and runtime images (no registry needed),
# `make test` runs everything CI runs, `make bench` prints the benchmark numbers.
SHELL := /bin/bash
CARGO ?= cargo
RUNTIME_IMAGES := node python wasm
# `docker compose` where the user has it, else Debian's docker-compose v1.
COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
API := http://127.0.0.1:8080

.PHONY: images base $(RUNTIME_IMAGES) rabbitmq-image executor-image balancer-image builds-image up down hello cli test lint bench clean-test

# The broker's image is here too: the build tests run RabbitMQ from it.
images: base $(RUNTIME_IMAGES) rabbitmq-image

base:
	bash runtimes/base/build.sh

node: base
	docker build -q -t hearth/node:v5-18 -f runtimes/node/Dockerfile runtimes

python: base
	docker build -q -t hearth/python:v5-3.11 -f runtimes/python/Dockerfile runtimes

# The Wasm image carries the workspace's release binary: stage it with the helpers in a small
# context (target/images/wasm) instead of sending the whole repository to docker.
wasm: base
	$(CARGO) build --release -q -p hearth-wasm-runtime
	@rm -rf target/images/wasm && mkdir -p target/images/wasm/base target/images/wasm/wasm
	@cp target/release/hearth-wasm-runtime target/images/wasm/
	@cp -r runtimes/base/helpers target/images/wasm/base/ && cp -r runtimes/wasm/helpers target/images/wasm/wasm/
	docker build -q -t hearth/wasm:v5-1 -f runtimes/wasm/Dockerfile target/images/wasm

executor-image: base
	$(CARGO) build --release -q -p hearth-executor
	@mkdir -p target/images/executor && cp target/release/hearth-executor target/images/executor/
	docker build -q -t hearth/executor:latest -f executor/Dockerfile target/images/executor

rabbitmq-image: base
	docker build -q -t hearth/rabbitmq:3 builds/rabbitmq

builds-image: base
	$(CARGO) build --release -q -p hearth-builds
	@mkdir -p target/images/builds && cp target/release/hearth-builds target/images/builds/
	docker build -q -t hearth/builds:latest -f builds/Dockerfile target/images/builds

balancer-image: base
	$(CARGO) build --release -q -p hearth-balancer
	@mkdir -p target/images/balancer && cp target/release/hearth-balancer target/images/balancer/
	docker build -q -t hearth/balancer:latest -f balancer/Dockerfile target/images/balancer

# The stack: images, .env (a random OPR_EXECUTOR_SECRET once), the example staged in storage,
# compose up, wait for health, print how to call it.
up: images executor-image balancer-image builds-image
	@test -f .env || printf 'OPR_EXECUTOR_SECRET=%s\n' "$$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" > .env
	@grep -q '^HEARTH_RUNTIMES_DIR=' .env || printf 'HEARTH_RUNTIMES_DIR=%s\n' "$(CURDIR)/data/runtimes" >> .env
	@mkdir -p data/storage/functions data/runtimes data/builds
	@tar -C runtimes/node/example -czf data/storage/functions/hello.tar.gz .
	@tar -C runtimes/python/example -czf data/storage/functions/hello-python.tar.gz .
	@tar -C runtimes/wasm/example -czf data/storage/functions/hello-wasm.tar.gz .
	$(COMPOSE) up -d
	@for i in $$(seq 1 100); do curl -fsS $(API)/v1/health >/dev/null 2>&1 && break; sleep 0.2; done
	@curl -fsS $(API)/v1/health >/dev/null || { echo "the executor did not become healthy"; $(COMPOSE) logs --tail 50; exit 1; }
	@for i in $$(seq 1 100); do curl -fsS http://127.0.0.1:8081/v1/health >/dev/null 2>&1 && break; sleep 0.2; done
	@curl -fsS http://127.0.0.1:8081/v1/health >/dev/null || { echo "the build service did not become healthy"; $(COMPOSE) logs --tail 50 builds; exit 1; }
	@echo "Hearth is up: executor API at $(API) (secret in .env). Invoke the example:"
	@echo "  curl -s -H \"Authorization: Bearer \$$(sed -n 's/^OPR_EXECUTOR_SECRET=//p' .env)\" -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"image\":\"hearth/node:v5-18\",\"source\":\"/storage/functions/hello.tar.gz\",\"entrypoint\":\"index.js\"}' \\"
	@echo "    -H 'Accept: application/json' $(API)/v1/runtimes/hello/executions"
	@echo "Build a function (git or archive) through the same endpoint: see the README's Builds section."

# Removes everything `make up` started: the stack, its runtimes, its network.
down:
	-$(COMPOSE) stop
	-docker ps -aq --filter label=hearth.executor=hearth-executor-1 | xargs -r docker rm -f -v >/dev/null
	-docker ps -aq --filter label=hearth.executor=hearth-executor-2 | xargs -r docker rm -f -v >/dev/null
	-$(COMPOSE) down --remove-orphans

# Build the images, build the Node example with the image's build step, run it, call it once.
hello: images
	bash runtimes/hello.sh node

# The `hearth` command, at target/release/hearth.
cli:
	$(CARGO) build --release -q -p hearth-cli
	@echo "target/release/hearth (run it from this folder: it reads the secret from .env)"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: images lint
	$(CARGO) test --workspace -- --nocapture

bench: images executor-image
	$(CARGO) build --release -q -p hearth-balancer
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { echo "the balancer bench compares with nginx: apt-get install -y nginx-light"; exit 1; }
	$(CARGO) run --release -q -p hearth-tests --bin bench -- $(BENCH_ARGS)

# Remove whatever a crashed test left behind (only what carries the test label).
clean-test:
	docker ps -aq --filter label=hearth.test=1 | xargs -r docker rm -f -v
