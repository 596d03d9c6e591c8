# Hearth entry points. `make images` builds the base and runtime images (no registry needed),
# `make test` runs everything CI runs, `make bench` prints the benchmark numbers.
SHELL := /bin/bash
CARGO ?= cargo
RUNTIME_IMAGES := node python wasm
# `docker compose` where the user has it, else Debian's docker-compose v1.
COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
API := http://127.0.0.1:8080

.PHONY: images base $(RUNTIME_IMAGES) rabbitmq-image executor-image balancer-image builds-image stack-files up wait-healthy down swarm-up swarm-down hello cli test lint bench bench-images clean-test

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

# The stack's name: compose's project and Swarm's stack (services `hearth_executor`, ...).
STACK := hearth
export COMPOSE_PROJECT_NAME := $(STACK)
# Executors `make up` starts (`make up EXECUTORS=3`); `make swarm-up` starts the file's replicas.
EXECUTORS ?= 2
# Under Swarm: the runtimes' network is the overlay network hearth-swarm (not the bridge
# hearth-runtimes that executors on the host create), the executors use the Swarm adapter, the
# balancer finds every executor task through `tasks.executor`.
SWARM_ENV := HEARTH_NETWORK=hearth-swarm HEARTH_NETWORK_DRIVER=overlay HEARTH_ADAPTER=swarm HEARTH_BALANCER_EXECUTORS=tasks.executor:80
# Set when `make swarm-up` made this engine a swarm: `make swarm-down` then leaves it again.
SWARM_MARK := data/.swarm-created-by-make

# What both ways of running the stack need: .env (a random OPR_EXECUTOR_SECRET once), the
# secret as a file (a compose file secret / a Swarm secret), the folders, the examples staged.
stack-files:
	@test -f .env || printf 'OPR_EXECUTOR_SECRET=%s\n' "$$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" > .env
	@grep -q '^HEARTH_RUNTIMES_DIR=' .env || printf 'HEARTH_RUNTIMES_DIR=%s\n' "$(CURDIR)/data/runtimes" >> .env
	@mkdir -p data/storage/functions data/runtimes data/builds data/secrets
	@(umask 077 && sed -n 's/^OPR_EXECUTOR_SECRET=//p' .env | tr -d '\n' > data/secrets/opr_executor_secret)
	@tar -C runtimes/node/example -czf data/storage/functions/hello.tar.gz .
	@tar -C runtimes/python/example -czf data/storage/functions/hello-python.tar.gz .
	@tar -C runtimes/wasm/example -czf data/storage/functions/hello-wasm.tar.gz .

# The compose stack: images, stack files, compose up, wait for health, print how to call it.
up: images executor-image balancer-image builds-image stack-files
	@! docker service ls -q --filter label=com.docker.stack.namespace=$(STACK) 2>/dev/null | grep -q . || { echo "the Swarm stack $(STACK) is up: make swarm-down first"; exit 1; }
	$(COMPOSE) up -d --scale executor=$(EXECUTORS)
	@$(MAKE) -s wait-healthy
	@echo "Hearth is up: executor API at $(API) (secret in .env). Invoke the example:"
	@echo "  curl -s -H \"Authorization: Bearer \$$(sed -n 's/^OPR_EXECUTOR_SECRET=//p' .env)\" -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"image\":\"hearth/node:v5-18\",\"source\":\"/storage/functions/hello.tar.gz\",\"entrypoint\":\"index.js\"}' \\"
	@echo "    -H 'Accept: application/json' $(API)/v1/runtimes/hello/executions"
	@echo "Build a function (git or archive) through the same endpoint: see the README's Builds section."

# Waits for the balancer and the build API to answer (up to 60 s).
wait-healthy:
	@for i in $$(seq 1 300); do curl -fsS $(API)/v1/health >/dev/null 2>&1 && break; sleep 0.2; done
	@curl -fsS $(API)/v1/health >/dev/null || { echo "the executor did not become healthy"; $(COMPOSE) logs --tail 50 2>/dev/null; docker service logs --tail 50 $(STACK)_executor 2>/dev/null; exit 1; }
	@for i in $$(seq 1 300); do curl -fsS http://127.0.0.1:8081/v1/health >/dev/null 2>&1 && break; sleep 0.2; done
	@curl -fsS http://127.0.0.1:8081/v1/health >/dev/null || { echo "the build service did not become healthy"; $(COMPOSE) logs --tail 50 builds 2>/dev/null; docker service logs --tail 50 $(STACK)_builds 2>/dev/null; exit 1; }

# Removes everything `make up` started: the stack, its runtimes (label hearth.stack), its network.
# The executors stop first, so none starts a runtime while they are removed.
down:
	-$(COMPOSE) stop
	-docker ps -aq --filter label=hearth.stack=$(STACK) --filter label=hearth.executor | xargs -r docker rm -f -v >/dev/null
	-$(COMPOSE) down --remove-orphans

# The same stack on Docker Swarm (`docker stack deploy`, the locally built images, no registry):
# makes this engine a single-node swarm if it is not in one, deploys, waits until every service
# runs and the API answers.
swarm-up: images executor-image balancer-image builds-image stack-files
	@if [ "$$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then \
	  docker swarm init --advertise-addr 127.0.0.1 >/dev/null && touch $(SWARM_MARK) && echo "this engine is now a single-node swarm (make swarm-down leaves it)"; fi
	@docker node ls >/dev/null 2>&1 || { echo "this engine is a Swarm worker: run make swarm-up on a manager"; exit 1; }
	@! docker ps -q --filter label=com.docker.compose.project=$(STACK) | grep -q . || { echo "the compose stack $(STACK) is up: make down first"; exit 1; }
	@! docker network ls -q --filter scope=local --filter 'name=^hearth-swarm$$' | grep -q . || { echo "a local network named hearth-swarm is in the way: remove it first"; exit 1; }
	set -a && . ./.env && set +a && $(SWARM_ENV) docker stack deploy --resolve-image never --prune -c docker-compose.yml $(STACK)
	@for i in $$(seq 1 240); do \
	  docker stack services $(STACK) --format '{{.Replicas}}' | awk -F/ '$$1 != $$2 {x=1} END {exit x}' && break; sleep 0.5; done
	@docker stack services $(STACK) --format '{{.Name}} {{.Replicas}}' | awk -F'[ /]' '$$2 != $$3 {print "not running: " $$0; x=1} END {exit x}' || { docker stack ps --no-trunc $(STACK) | head -20; exit 1; }
	@$(MAKE) -s wait-healthy
	@echo "Hearth is up on Swarm (stack $(STACK)): executor API at $(API) (secret in .env; Swarm publishes 8080 and 8081 on every interface)."
	@echo "  target/release/hearth deploy runtimes/python/example --runtime hearth/python:v5-3.11 --entrypoint main.py --name hello-py   # make cli first"
	@echo "  target/release/hearth invoke hello-py --data '{\"name\":\"Ada\"}' --header 'content-type: application/json'"
	@echo "  docker service scale $(STACK)_executor=3; make swarm-down removes everything"

# Removes everything `make swarm-up` started and waits until it is gone: the executors first
# (so none starts a runtime meanwhile), their runtime services (label hearth.stack), then the
# stack with its networks, secret and configs. Leaves the swarm only if `make swarm-up` created
# it and nothing else runs on it. The rabbitmq volume and data/ stay, as with `make down`.
swarm-down:
	@if [ "$$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then echo "this engine is in no swarm"; rm -f $(SWARM_MARK); exit 0; fi; \
	docker service rm $(STACK)_executor >/dev/null 2>&1; \
	for i in $$(seq 1 120); do docker ps -aq --filter label=com.docker.swarm.service.name=$(STACK)_executor | grep -q . || break; sleep 0.5; done; \
	docker service ls -q --filter label=hearth.stack=$(STACK) | xargs -r docker service rm >/dev/null; \
	docker stack rm $(STACK) >/dev/null 2>&1; \
	for i in $$(seq 1 240); do \
	  left="$$(docker service ls -q --filter label=com.docker.stack.namespace=$(STACK); docker service ls -q --filter label=hearth.stack=$(STACK); \
	    docker ps -aq --filter label=com.docker.stack.namespace=$(STACK); docker ps -aq --filter label=hearth.stack=$(STACK) --filter label=com.docker.swarm.service.id; \
	    docker network ls -q --filter label=com.docker.stack.namespace=$(STACK); docker network ls -q --filter scope=swarm --filter name=^hearth-swarm$$; \
	    docker secret ls -q --filter label=com.docker.stack.namespace=$(STACK); docker config ls -q --filter label=com.docker.stack.namespace=$(STACK))"; \
	  [ -z "$$left" ] && break; \
	  if [ $$i = 40 ]; then docker network rm hearth-swarm >/dev/null 2>&1; fi; \
	  sleep 0.5; done; \
	if [ -n "$$left" ]; then echo "still left after 2 minutes:"; echo "$$left"; exit 1; fi; \
	if [ -f $(SWARM_MARK) ] && [ -z "$$(docker service ls -q)" ]; then docker swarm leave --force >/dev/null && echo "left the swarm make swarm-up created"; fi; \
	rm -f $(SWARM_MARK); echo "the Swarm stack $(STACK) is gone"

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

# The Swarm tests run last and on their own: they take 127.0.0.1:8080/8081, `.env`, `data/` and
# the engine's swarm state (`make swarm-up` builds the service images itself).
# A failing test's error comes first, without an error backtrace burying it (panics keep theirs).
# The Swarm tests make the engine a single-node swarm when it is in none. When they did, `make
# test` leaves that swarm afterwards, with the docker_gwbridge network it made, so a test run
# leaves the engine as it found it (a swarm the engine was already in stays).
SWARM_TESTS ?= $(CARGO) test -p hearth-tests --test all swarm_ -- --nocapture
test: images lint
	RUST_LIB_BACKTRACE=0 $(CARGO) test --workspace -- --nocapture --skip swarm_
	@swarm="$$(docker info --format '{{.Swarm.LocalNodeState}}')"; \
	gwbridge="$$(docker network ls -q --filter name=^docker_gwbridge$$)"; \
	echo "$(SWARM_TESTS)"; RUST_LIB_BACKTRACE=0 $(SWARM_TESTS); rc=$$?; \
	if [ "$$swarm" != active ] && [ "$$(docker info --format '{{.Swarm.LocalNodeState}}')" = active ] \
	  && [ -z "$$(docker service ls -q)" ]; then \
	  docker swarm leave --force >/dev/null && echo "left the swarm the Swarm tests made"; \
	  if [ -z "$$gwbridge" ]; then docker network rm docker_gwbridge >/dev/null 2>&1 || true; fi; \
	fi; \
	exit $$rc

bench: images executor-image bench-images
	$(CARGO) build --release -q -p hearth-balancer
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { echo "the balancer bench compares with nginx: apt-get install -y nginx-light"; exit 1; }
	$(CARGO) run --release -q -p hearth-tests --bin bench -- $(BENCH_ARGS)

# Images only the bench uses (a reference proxy).
bench-images: base
	docker build -q -t hearth-bench/nginx:latest tests/bench/nginx

# Remove whatever a crashed test left behind (only what carries the test label).
clean-test:
	docker ps -aq --filter label=hearth.test=1 | xargs -r docker rm -f -v
