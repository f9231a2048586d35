# The busybox applets of the guest (sourced by build-initramfs.sh and build-busybox.sh).
#
# required_applets: what the guest contract and the boot tests rely on: an initramfs
#                   build fails when its busybox lacks one.
# extra_applets:    conveniences for a person at the shell.  Not awk (45 KB with the
#                   maths it pulls in), vi (20 KB) or less (7 KB): nothing in the guest
#                   runs them, and sed, grep, cut and more are here.
# build-busybox.sh builds a busybox with exactly these applets; with Debian's
# busybox-static instead, the extras it lacks are simply absent.
required_applets="sh ash cat ls echo dd reboot poweroff halt sync mkdir grep sed
  sha256sum md5sum stat head tail wc sleep nproc uname dmesg cttyhack setsid printf
  test [ true false rm mv cp find cmp mount umount"
extra_applets="[[ basename blockdev chmod chown clear cut date devmem df diff
  dirname du env egrep expr fgrep free fsfreeze hexdump hostname id insmod kill
  killall ln lsmod mknod mktemp more od pidof ps pwd readlink realpath reset
  rmdir rmmod seq sha1sum sha512sum sort stty sysctl tee time timeout top touch tr
  truncate tty uniq uptime usleep which xargs xxd yes"
