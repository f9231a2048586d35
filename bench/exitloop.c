/* The C side of bench/exit.py: the same tiny guest, driven by a bare KVM_RUN loop.
 *
 * bench/exit.py builds the guest once with pyvmm (guest RAM image, registers, CPUID)
 * and writes it to a directory; this program loads it byte for byte, runs it and times
 * its phases.  It does what a minimal VMM must and nothing else:
 *
 *   KVM_CREATE_VM, KVM_SET_TSS_ADDR, KVM_CREATE_IRQCHIP (as pyvmm's VM does),
 *   KVM_SET_USER_MEMORY_REGION (RAM at guest-physical 0), KVM_CREATE_VCPU + mmap of
 *   kvm_run, KVM_SET_CPUID2, KVM_SET_SREGS, KVM_SET_REGS, then KVM_RUN until the
 *   guest writes the end port.
 *
 * Every write to the mark port ends one phase: the time since the previous mark
 * (CLOCK_MONOTONIC, and this thread's CPU time, which includes the time in the
 * guest: both read right after KVM_RUN returned that exit, as pyvmm's mark device
 * does) and the exits counted in it are printed as one line
 *     phase <i> ns=<ns> cpu_ns=<ns> pio=<n> mmio=<n> other=<n>
 * Reads (none in the bench guest) are answered with all ones.
 *
 * usage: exitloop DIR MARK_PORT END_PORT TSS_ADDR      (build: gcc -O2)
 * DIR holds mem.bin, sregs.bin, regs.bin, cpuid.bin (raw struct bytes of linux/kvm.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MAX_PHASES 16

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* Read DIR/name into a new buffer of exactly `size` bytes (size 0: whatever the file holds). */
static void *load(const char *dir, const char *name, size_t *size)
{
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "rb");
	if (!f)
		die(path);
	fseek(f, 0, SEEK_END);
	long len = ftell(f);
	rewind(f);
	if (len <= 0 || (*size && (size_t)len != *size)) {
		fprintf(stderr, "%s: %ld bytes, expected %zu\n", path, len, *size);
		exit(1);
	}
	void *buf = malloc(len);
	if (!buf || fread(buf, 1, len, f) != (size_t)len)
		die(path);
	fclose(f);
	*size = len;
	return buf;
}

static uint64_t now_ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s DIR MARK_PORT END_PORT TSS_ADDR\n", argv[0]);
		return 2;
	}
	const char *dir = argv[1];
	unsigned mark_port = strtoul(argv[2], NULL, 0), end_port = strtoul(argv[3], NULL, 0);
	unsigned long tss_addr = strtoul(argv[4], NULL, 0);

	size_t mem_size = 0, sregs_size = sizeof(struct kvm_sregs), regs_size = sizeof(struct kvm_regs);
	size_t cpuid_size = 0;
	void *image = load(dir, "mem.bin", &mem_size);
	struct kvm_sregs *sregs = load(dir, "sregs.bin", &sregs_size);
	struct kvm_regs *regs = load(dir, "regs.bin", &regs_size);
	struct kvm_cpuid2 *cpuid = load(dir, "cpuid.bin", &cpuid_size);
	if (cpuid_size < sizeof(*cpuid) ||
	    cpuid_size != sizeof(*cpuid) + cpuid->nent * sizeof(cpuid->entries[0])) {
		fprintf(stderr, "cpuid.bin: %zu bytes do not match its nent\n", cpuid_size);
		return 1;
	}

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	if (ioctl(vm, KVM_SET_TSS_ADDR, tss_addr) < 0)
		die("KVM_SET_TSS_ADDR");
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
		die("KVM_CREATE_IRQCHIP");

	void *ram = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (ram == MAP_FAILED)
		die("mmap RAM");
	memcpy(ram, image, mem_size);
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = mem_size,
		.userspace_addr = (uintptr_t)ram,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < (int)sizeof(struct kvm_run))
		die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");
	if (ioctl(vcpu, KVM_SET_SREGS, sregs) < 0)
		die("KVM_SET_SREGS");
	if (ioctl(vcpu, KVM_SET_REGS, regs) < 0)
		die("KVM_SET_REGS");

	uint64_t pio = 0, mmio = 0, other = 0, last = 0, last_cpu = 0;
	int phase = -1;  /* the first mark starts phase 0 */
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason == KVM_EXIT_IO) {
			if (run->io.port == mark_port && run->io.direction == KVM_EXIT_IO_OUT) {
				uint64_t t = now_ns(CLOCK_MONOTONIC), cpu = now_ns(CLOCK_THREAD_CPUTIME_ID);
				if (phase >= 0)
					printf("phase %d ns=%llu cpu_ns=%llu pio=%llu mmio=%llu other=%llu\n",
					       phase, (unsigned long long)(t - last),
					       (unsigned long long)(cpu - last_cpu), (unsigned long long)pio,
					       (unsigned long long)mmio, (unsigned long long)other);
				if (++phase >= MAX_PHASES) {
					fprintf(stderr, "more than %d phases\n", MAX_PHASES);
					return 1;
				}
				pio = mmio = other = 0;
				last = t;
				last_cpu = cpu;
				continue;
			}
			if (run->io.port == end_port && run->io.direction == KVM_EXIT_IO_OUT)
				break;
			if (run->io.direction == KVM_EXIT_IO_IN)
				memset((char *)run + run->io.data_offset, 0xff,
				       (size_t)run->io.size * run->io.count);
			pio++;
		} else if (run->exit_reason == KVM_EXIT_MMIO) {
			if (!run->mmio.is_write)
				memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
			mmio++;
		} else if (run->exit_reason == KVM_EXIT_HLT) {
			break;
		} else {
			other++;
			if (other > 1000) {
				fprintf(stderr, "unexpected exit reason %u\n", run->exit_reason);
				return 1;
			}
		}
	}
	return 0;
}
