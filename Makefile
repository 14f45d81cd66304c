# Vigil: `make run` and `make test` work on a fresh Debian machine.
SHELL := /bin/bash
# Go from /usr/local/go (the official tarball) when it is not on PATH.
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
BIN := bin
DATA_DIR ?= $(shell if [ "$$(id -u)" = 0 ]; then echo /var/lib/vigil; else echo $${XDG_STATE_HOME:-$$HOME/.local/state}/vigil; fi)
# As root, make run gives VMs a managed network (bridge, DHCP, NAT) as
# libvirt's default network does; VMs are reached at their own address.
# Without root they get QEMU's user-mode network and a forwarded port.
DEFAULT_NETWORK ?= 10.231.0.0/24
RUN_NETWORK := $(if $(filter 0,$(shell id -u)),--default-network $(DEFAULT_NETWORK))
# Tests and benchmarks share one guest image, built once.
TEST_IMAGE := $(CURDIR)/build/image
# ... and one Debian image with cloud-init and qemu-guest-agent, built from
# Debian's packages (needs root: debootstrap; rebuilt when its script changes).
DEBIAN_DIR := $(CURDIR)/build/debian
DEBIAN_IMAGE := $(DEBIAN_DIR)/debian-12.qcow2
# ... and Debian's netboot installer wrapped in a bootable ISO.
INSTALLER_DIR := $(CURDIR)/build/installer
INSTALLER_ISO := $(INSTALLER_DIR)/debian-installer.iso
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TEST_ENV := VIGIL_TEST_IMAGE=$(TEST_IMAGE) VIGIL_DEBIAN_IMAGE=$(DEBIAN_IMAGE) VIGIL_INSTALLER_ISO=$(INSTALLER_ISO) VIGIL_BIN=$(CURDIR)/$(BIN)

.PHONY: all deps deps-test build image run test test-image debian-image installer-iso test-short fuzz bench fmt vet clean

all: build

# deps installs what Vigil needs from Debian when it is missing; deps-test
# adds what the tests need (the real qemu-guest-agent, ISO tools).
deps:
	@./scripts/install-deps.sh

deps-test:
	@./scripts/install-deps.sh --test

build:
	$(GO) build -ldflags='-s -w' -o $(BIN)/vigil ./cmd/vigil
	CGO_ENABLED=0 $(GO) build -ldflags='-s -w' -o $(BIN)/vigil-guest ./cmd/vigil-guest

image: deps build
	$(BIN)/vigil image build --data-dir $(DATA_DIR)

run: deps build
	$(BIN)/vigil image build --data-dir $(DATA_DIR)
	$(BIN)/vigil agent --dev --data-dir $(DATA_DIR) $(RUN_NETWORK)

test-image: deps-test build debian-image installer-iso
	$(BIN)/vigil image build --out $(TEST_IMAGE) -q

debian-image:
	$(SUDO) ./scripts/build-debian-image.sh $(DEBIAN_DIR)

installer-iso:
	$(SUDO) ./scripts/build-installer-iso.sh $(INSTALLER_DIR)

test: test-image
	gofmt -l . | (! grep .) || (echo "gofmt needed on the files above"; exit 1)
	$(GO) vet ./...
	$(TEST_ENV) $(GO) test -count=1 -timeout 35m ./...
	./scripts/fuzz.sh

# fuzz runs every fuzz target for FUZZTIME (default 5s); make test runs it too.
fuzz:
	./scripts/fuzz.sh

test-short:
	$(GO) test -short -count=1 ./...

bench: test-image
	@./scripts/install-deps.sh --bench
	$(TEST_ENV) $(GO) run ./cmd/vigil-bench -out docs/benchmarks.md

fmt:
	gofmt -w .

clean:
	rm -rf $(BIN) build
