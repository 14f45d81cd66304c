# Vigil: `make run` and `make test` work on a fresh Debian machine.
SHELL := /bin/bash
# Go from /usr/local/go (the official tarball) when it is not on PATH.
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
BIN := bin
DATA_DIR ?= $(shell if [ "$$(id -u)" = 0 ]; then echo /var/lib/vigil; else echo $${XDG_STATE_HOME:-$$HOME/.local/state}/vigil; fi)
# Tests and benchmarks share one guest image, built once.
TEST_IMAGE := $(CURDIR)/build/image

.PHONY: all deps build image run test test-short fuzz bench fmt vet clean

all: build

# deps installs what Vigil needs from Debian when it is missing.
deps:
	@./scripts/install-deps.sh

build:
	$(GO) build -o $(BIN)/vigil ./cmd/vigil
	CGO_ENABLED=0 $(GO) build -ldflags='-s -w' -o $(BIN)/vigil-guest ./cmd/vigil-guest

image: deps build
	$(BIN)/vigil image build --data-dir $(DATA_DIR)

run: deps build
	$(BIN)/vigil image build --data-dir $(DATA_DIR)
	$(BIN)/vigil agent --dev --data-dir $(DATA_DIR)

test-image: deps build
	$(BIN)/vigil image build --out $(TEST_IMAGE) -q

test: test-image
	gofmt -l . | (! grep .) || (echo "gofmt needed on the files above"; exit 1)
	$(GO) vet ./...
	VIGIL_TEST_IMAGE=$(TEST_IMAGE) VIGIL_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 20m ./...
	./scripts/fuzz.sh

# fuzz runs every fuzz target for FUZZTIME (default 5s); make test runs it too.
fuzz:
	./scripts/fuzz.sh

test-short:
	$(GO) test -short -count=1 ./...

bench: test-image
	VIGIL_TEST_IMAGE=$(TEST_IMAGE) VIGIL_BIN=$(CURDIR)/$(BIN) $(GO) run ./cmd/vigil-bench -out docs/benchmarks.md

fmt:
	gofmt -w .

clean:
	rm -rf $(BIN) build
