# pyvmm: the README's two commands are `make demo` and `make test`; both do
# all the set-up they need on a fresh Debian 12 machine (as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KERNEL ?= default
GUEST := guest/build
export PYVMM_CACHE ?= /var/cache/pyvmm

# What `make demo` needs: the venv, the kernel build (guest/build-kernel.sh), the
# initramfs build (guest/build-initramfs.sh; kmod for KERNEL=debian) and its busybox
# (guest/build-busybox.sh: bzip2 for its source; busybox-static is the fallback).
APT_PACKAGES := python3-venv gcc libc6-dev make patch flex bison bc libelf-dev \
	xz-utils kmod musl-tools busybox-static linux-source-6.1 bzip2
# What only `make test` and the benchmarks add: QEMU (the interop tests and the
# peer in bench/; qemu-system-common has Debian's C virtiofsd) and cpio (a test
# reads the initramfs back with it).
APT_TEST_PACKAGES := cpio qemu-system-x86 qemu-system-common

# Install those of the Debian packages $(1) that are missing (as root), without
# their recommends (QEMU's alone would bring GTK, Mesa, SDL and Ceph).
define apt_ensure
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "setup: installing $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

.PHONY: setup setup-test guest demo test test-fast bench bench-deps bench-boot bench-boot-ram bench-blk bench-fs bench-exit bench-plot soak fuzz clean

# --- set-up ---------------------------------------------------------------------
setup: $(VENV)/.installed

.apt-stamp: Makefile
	$(call apt_ensure,$(APT_PACKAGES))
	@touch $@

setup-test: setup .apt-test-stamp

.apt-test-stamp: Makefile
	$(call apt_ensure,$(APT_TEST_PACKAGES))
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
# Two workers: boots are CPU-bound guest-kernel emulation on PVM hosts, and the
# boot tests of one file stay on one worker (--dist loadfile: module fixtures,
# such as the snapshot test_snapshot_boot.py restores, are made once).
test: guest setup-test
	$(PY) -m pytest -q -ra -n 2 --dist loadfile tests

test-fast: setup-test
	$(PY) -m pytest -q -ra -m "not boot" tests

bench: bench-boot bench-blk bench-fs bench-exit
	$(MAKE) bench-plot

# The peer: QEMU from Debian (in APT_TEST_PACKAGES: the interop tests need it too).
bench-deps: guest setup-test

bench-boot: bench-deps
	$(PY) -m bench.boot

# Boot time per RAM size (bench/figures/boot-ram.png): one bench-boot run per size,
# with pyvmm's deferred RAM (the default on PVM) and with --memory-at-boot.
BOOT_RAM_SIZES ?= 256M 1G 2G
bench-boot-ram: bench-deps
	@for m in $(BOOT_RAM_SIZES); do \
		$(PY) -m bench.boot --memory $$m --runs 2 --no-rss \
			--setups pyvmm,pyvmm-ram-at-boot,pyvmm-exec,qemu-microvm-tcg || exit 1; \
	done

bench-blk: bench-deps
	$(PY) -m bench.blk

bench-fs: bench-deps
	$(PY) -m bench.fs

# Exit cost: a tiny assembled guest (no kernel image, no QEMU) through pyvmm's run loop
# and through bench/exitloop.c, which it builds with gcc (in APT_PACKAGES).
bench-exit: setup
	$(PY) -m bench.exit

# Charts of the newest results (bench/figures/*.png, shown in the READMEs).
bench-plot: $(VENV)/.bench-installed
	$(PY) -m bench.plot

$(VENV)/.bench-installed: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	@touch $@
# SOAK_BOOTS boots with a DAX share and a command each, then SOAK_KILLS whose back-end
# is killed mid-run; no leak and no failure allowed (bench/README.md). About 35 s a run
# on a PVM host: the defaults take an hour and more.
SOAK_BOOTS ?= 100
SOAK_KILLS ?= 20

soak: guest setup
	$(PY) -m bench.soak --boots $(SOAK_BOOTS) --kills $(SOAK_KILLS)

# --- fuzzing (not part of `make test`, which only replays fuzz/corpus/) ---------------
# Each target in turn, niced, for FUZZ_RUNS inputs; new inputs go to $(FUZZ_WORK)/TARGET,
# crashes to $(FUZZ_WORK)/TARGET-crash-*.  `make fuzz FUZZ_RUNS=1000000` is the full run.
FUZZ_RUNS ?= 100000
FUZZ_WORK ?= .fuzz
FUZZ_TARGETS ?= virtqueue virtio_pci vhost_user_protocol virtiofsd_messages dax_requests fuse_server

$(VENV)/.fuzz-installed: pyproject.toml $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[test,fuzz]'
	@touch $@

fuzz: $(VENV)/.fuzz-installed
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_WORK)/$$t; \
		echo "fuzz: $$t, $(FUZZ_RUNS) runs"; \
		nice -n 10 $(PY) fuzz/$$t.py -atheris_runs=$(FUZZ_RUNS) \
			-artifact_prefix=$(FUZZ_WORK)/$$t- $(FUZZ_WORK)/$$t fuzz/corpus/$$t || exit 1; \
	done

clean:
	rm -rf $(GUEST) $(VENV) .apt-stamp .apt-test-stamp .pytest_cache $(FUZZ_WORK)
