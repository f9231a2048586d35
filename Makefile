# pyvmm: the README's two commands are `make demo` and `make test`; both do
# all the set-up they need on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KERNEL ?= default
GUEST := guest/build
export PYVMM_CACHE ?= /var/cache/pyvmm

APT_PACKAGES := python3-venv gcc libc6-dev make patch flex bison bc libelf-dev libssl-dev \
	xz-utils cpio kmod musl-tools busybox-static linux-source-6.1 \
	qemu-system-common qemu-system-x86

# Install those of the Debian packages $(1) that are missing (as root).
define apt_ensure
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "setup: installing $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
endef

.PHONY: setup guest demo test test-fast bench bench-deps bench-boot bench-blk bench-fs clean

# --- set-up ---------------------------------------------------------------------
setup: $(VENV)/.installed

.apt-stamp: Makefile
	$(call apt_ensure,$(APT_PACKAGES))
	@touch $@

$(VENV)/.installed: pyproject.toml .apt-stamp
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

# --- guest image ------------------------------------------------------------------
ifeq ($(KERNEL),debian)
guest: setup
	guest/fetch-debian-kernel.sh $(GUEST)/debian
	guest/build-initramfs.sh $(GUEST)/initramfs-debian.cpio --modules $(GUEST)/debian/modules
else
guest: setup
	guest/build-kernel.sh $(GUEST)/vmlinux
	guest/build-initramfs.sh $(GUEST)/initramfs.cpio
endif

# --- the main job -----------------------------------------------------------------
demo: guest
	guest/demo.sh

# --- tests and benchmarks ---------------------------------------------------------
test: guest
	$(PY) -m pytest -q -ra tests

test-fast: setup
	$(PY) -m pytest -q -ra -m "not boot" tests

bench: bench-boot bench-blk bench-fs

# The peer: QEMU from Debian (in APT_PACKAGES: the interop test needs it too).
bench-deps: guest

bench-boot: bench-deps
	$(PY) -m bench.boot

bench-blk: bench-deps
	$(PY) -m bench.blk

bench-fs: bench-deps
	$(PY) -m bench.fs

clean:
	rm -rf $(GUEST) $(VENV) .apt-stamp .pytest_cache
