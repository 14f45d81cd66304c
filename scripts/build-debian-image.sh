#!/usr/bin/env bash
# build-debian-image.sh OUT_DIR
#
# Builds OUT_DIR/debian-12.qcow2: a Debian 12 (bookworm) cloud-style disk image for
# Vigil's "real guest" tests and for users, from Debian's own packages.
#
# What the image is
#   - MBR disk, 2 GiB virtual size (compressed qcow2); one ext4 partition (label "root")
#     from 1 MiB to the end. cloud-init grows partition and file system to the disk size
#     on first boot (growpart from cloud-guest-utils + resizefs).
#   - Boots with SeaBIOS from the disk alone: GRUB (i386-pc) boot.img in the MBR and
#     core.img in the gap before the partition; /boot/grub/grub.cfg boots /vmlinuz and
#     /initrd.img (Debian's symlinks, so kernel upgrades inside the guest keep booting)
#     with "console=tty0 console=ttyS0,115200" and no menu timeout.
#   - systemd, udev, linux-image-cloud-amd64, cloud-init (datasource_list
#     [ NoCloud, ConfigDrive, None ], units enabled), qemu-guest-agent (started by udev
#     when /dev/virtio-ports/org.qemu.guest_agent.0 appears), ifupdown + isc-dhcp-client
#     (cloud-init writes /etc/network/interfaces.d/50-cloud-init), openssh-server (host
#     keys made on first boot), busybox (e.g. `busybox httpd`), fio and iperf3 (benchmarks), locales (LANG=C.UTF-8),
#     serial getty on ttyS0, empty /etc/machine-id, no root password, apt-daily timers off.
#
# How it is built (no loop devices, no mounts of the image)
#   1. debootstrap --variant=minbase --include=... into a temp dir (debootstrap itself
#      mounts /proc and /sys inside the chroot while it installs, and unmounts them).
#   2. Configuration by writing files and `chroot ROOT systemctl enable ...`.
#   3. mke2fs -t ext4 -d ROOT writes the file system straight into a partition image.
#   4. The guest's own grub-mkimage (package grub-pc-bin, run with chroot) makes
#      core.img; the MBR (boot.img + a hand-written partition entry) and core.img are
#      written with dd, then `qemu-img convert -c -O qcow2`.
#
# Cache: OUT_DIR/debian-12.stamp holds the SHA-256 of this script. When it matches and
# OUT_DIR/debian-12.qcow2 exists the script exits at once, so `make test` may call it on
# every run. Delete the stamp (or edit the script) to rebuild.
#
# Needs: root, network access to the Debian mirror, ~2.5 GB in TMPDIR, and these Debian
# packages (missing ones are installed with apt-get): debootstrap (pulls wget), qemu-utils,
# e2fsprogs, debian-archive-keyring (plus coreutils, util-linux, gawk/mawk of any Debian
# base system). GRUB and sfdisk are not needed on the host: the guest's own grub-mkimage
# is used and the partition table is written by hand.
#
# Environment (all optional):
#   DEBIAN_MIRROR      default http://deb.debian.org/debian
#   DEBIAN_CACHE_DIR   a directory for debootstrap --cache-dir (.deb files kept across builds)
#   TMPDIR             where the temp dir goes (default /var/tmp); needs ~2.5 GB free
#
# Booting it by hand (TCG; add a NoCloud seed ISO labelled "cidata" for cloud-init):
#   qemu-img create -f qcow2 -F qcow2 -b debian-12.qcow2 vm.qcow2 4G
#   qemu-system-x86_64 -machine q35 -accel tcg -m 512 -nographic \
#     -drive file=vm.qcow2,if=none,id=d0 -device virtio-blk-pci,drive=d0 \
#     -device virtio-serial-pci -chardev socket,id=qga,path=/tmp/qga.sock,server=on,wait=off \
#     -device virtserialport,chardev=qga,name=org.qemu.guest_agent.0 \
#     -netdev user,id=n0 -device virtio-net-pci,netdev=n0
set -euo pipefail

PROG=build-debian-image
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DISK_BYTES=$((2 * 1024 * 1024 * 1024)) # 2 GiB virtual size
PART_START=2048                         # sectors: partition at 1 MiB
INCLUDE=(
	systemd-sysv udev dbus
	linux-image-cloud-amd64 initramfs-tools zstd
	grub-pc-bin
	cloud-init python3-cffi-backend cloud-guest-utils fdisk
	qemu-guest-agent
	ifupdown isc-dhcp-client iproute2 netbase
	openssh-server sudo ca-certificates
	busybox locales less
	fio iperf3
)

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

[ $# -eq 1 ] || {
	echo "usage: $0 OUT_DIR" >&2
	exit 2
}
mkdir -p "$1"
OUT_DIR=$(cd "$1" && pwd)
IMAGE=$OUT_DIR/debian-12.qcow2
STAMP=$OUT_DIR/debian-12.stamp
SELF=$(readlink -f "${BASH_SOURCE[0]}")
HASH=$(sha256sum "$SELF" | cut -d' ' -f1)

up_to_date() { [ -s "$IMAGE" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; }
if up_to_date; then
	log "$IMAGE is up to date"
	exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot need it)"

# One build at a time per OUT_DIR; a second caller waits and then finds the image.
exec 9>"$OUT_DIR/.debian-12.lock"
flock 9
if up_to_date; then
	log "$IMAGE is up to date"
	exit 0
fi

START=$(date +%s)
export DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true LC_ALL=C.UTF-8 LANG=C.UTF-8
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# --- host tools -------------------------------------------------------------------------
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
	log "installing host packages: ${need[*]}"
	apt-get update -qq || die "apt-get update failed"
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
		die "apt-get install ${need[*]} failed"
fi

# --- temp dir and cleanup ---------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/vigil-debian-image.XXXXXX")
ROOT=$WORK/root
cleanup() {
	local rc=$? m
	set +e
	# Anything debootstrap left mounted under the chroot (only after a crash) must go
	# before rm -rf, or rm would walk into /proc and /sys of the host.
	awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r |
		while read -r m; do
			umount "$m" 2>/dev/null || umount -l "$m"
		done
	rm -rf --one-file-system "$WORK"
	rm -f "$IMAGE.tmp"
	if [ $rc -ne 0 ]; then
		log "FAILED (exit $rc) after $(($(date +%s) - START)) s; no image written"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'log "error: command failed (line $LINENO): $BASH_COMMAND"' ERR

# --- 1. debootstrap -----------------------------------------------------------------------
log "debootstrap $SUITE (minbase + ${#INCLUDE[@]} packages) from $MIRROR into $ROOT"
FS_UUID=$(cat /proc/sys/kernel/random/uuid)
mkdir -p "$ROOT/etc/dpkg/dpkg.cfg.d"
# Written first: debootstrap keeps an existing fstab and hostname.
cat >"$ROOT/etc/fstab" <<EOF
# <file system>	<mount point>	<type>	<options>	<dump>	<pass>
UUID=$FS_UUID	/	ext4	rw,discard,errors=remount-ro	0	1
EOF
echo debian >"$ROOT/etc/hostname"
# No fsync per file while installing: the result is copied by mke2fs anyway.
echo force-unsafe-io >"$ROOT/etc/dpkg/dpkg.cfg.d/00vigil-unsafe-io"
# A small initramfs (written before the kernel is installed, so debootstrap builds it this
# way): only the disk drivers a VM needs, loaded by udev. MODULES=most made a 16 MB initrd
# that GRUB reads slowly through the BIOS under TCG.
mkdir -p "$ROOT/etc/initramfs-tools/conf.d" "$ROOT/etc/initramfs-tools/hooks"
cat >"$ROOT/etc/initramfs-tools/conf.d/vigil.conf" <<'EOF'
# Vigil VM image: disk drivers come from hooks/vigil-vm-disks.
MODULES=list
COMPRESS=zstd
RESUME=none
# The root file system cannot be probed in a chroot: name its type, so fsck.ext4 is included.
FSTYPE=ext4
EOF
cat >"$ROOT/etc/initramfs-tools/hooks/vigil-vm-disks" <<'EOF'
#!/bin/sh
# Vigil VM image: drivers for the disks a VM may boot from (virtio-blk, virtio-scsi,
# SATA/AHCI, IDE, NVMe; ext4 and NVMe are built into the cloud kernel). udev loads them.
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk virtio_scsi sd_mod sr_mod ahci ata_piix nvme ext4 crc32c_generic; do
	manual_add_modules "$m"
done
EOF
chmod 755 "$ROOT/etc/initramfs-tools/hooks/vigil-vm-disks"
dbs_args=(--variant=minbase "--include=$(
	IFS=,
	echo "${INCLUDE[*]}"
)")
if [ -n "${DEBIAN_CACHE_DIR:-}" ]; then
	mkdir -p "$DEBIAN_CACHE_DIR"
	dbs_args+=("--cache-dir=$(cd "$DEBIAN_CACHE_DIR" && pwd)")
fi
if ! debootstrap "${dbs_args[@]}" "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
	tail -n 30 "$WORK/debootstrap.log" >&2
	[ -f "$ROOT/debootstrap/debootstrap.log" ] && tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2
	die "debootstrap failed (log above)"
fi
rm -f "$ROOT/etc/dpkg/dpkg.cfg.d/00vigil-unsafe-io"
log "debootstrap done after $(($(date +%s) - START)) s"

KVER=$(basename "$(readlink -f "$ROOT/vmlinuz")")
KVER=${KVER#vmlinuz-}
if [ ! -f "$ROOT/boot/vmlinuz-$KVER" ] || [ ! -f "$ROOT/boot/initrd.img-$KVER" ]; then
	die "no kernel/initrd in the chroot (/vmlinuz -> $(readlink "$ROOT/vmlinuz"))"
fi
chroot "$ROOT" lsinitramfs "/boot/initrd.img-$KVER" >"$WORK/initrd.list" ||
	die "lsinitramfs failed"
grep -q '/virtio_blk\.ko' "$WORK/initrd.list" || die "the initramfs has no virtio_blk driver"
grep -q 'sbin/fsck\.ext4' "$WORK/initrd.list" || die "the initramfs has no fsck.ext4"
for f in usr/bin/cloud-init usr/sbin/qemu-ga usr/bin/busybox usr/bin/grub-mkimage \
	usr/bin/growpart sbin/ifup sbin/dhclient lib/systemd/systemd bin/udevadm; do
	[ -e "$ROOT/$f" ] || die "/$f missing from the chroot"
done
# Every package configured (with minbase, cloud-init stays unconfigured unless
# python3-cffi-backend is named), and cloud-init's Python stack imports.
audit=$(chroot "$ROOT" dpkg --audit 2>&1) || true
[ -z "$audit" ] || die "packages not fully installed in the chroot: $audit"
chroot "$ROOT" python3 -c 'import _cffi_backend, cloudinit.cmd.main' ||
	die "cloud-init's Python modules do not import in the chroot"

# --- 2. configure -------------------------------------------------------------------------
log "configuring (kernel $KVER)"
CMDLINE="root=UUID=$FS_UUID ro console=tty0 console=ttyS0,115200n8 consoleblank=0"

cat >"$ROOT/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	debian
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
cat >"$ROOT/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
# debootstrap copies the build host's resolv.conf; dhclient writes the guest's own.
: >"$ROOT/etc/resolv.conf"
cat >"$ROOT/etc/network/interfaces" <<'EOF'
# interfaces(5) file used by ifup(8) and ifdown(8).
# cloud-init writes the configuration of the NICs to interfaces.d/50-cloud-init.
auto lo
iface lo inet loopback

source /etc/network/interfaces.d/*
EOF
mkdir -p "$ROOT/etc/network/interfaces.d"

cat >"$ROOT/etc/cloud/cloud.cfg.d/90_vigil.cfg" <<'EOF'
# Vigil's Debian image: NoCloud (an ISO/vfat volume labelled "cidata", or seedfrom on the
# kernel command line), then ConfigDrive, else no datasource.
datasource_list: [ NoCloud, ConfigDrive, None ]
manage_etc_hosts: true
# RSA (3072 bit) and DSA host keys took ~20 s of the first boot under TCG.
ssh_genkeytypes: [ ed25519, ecdsa ]
EOF

# Without a seed ds-identify would disable cloud-init for the boot, leaving the NIC
# unconfigured; enabled, cloud-init runs with DataSourceNone and its fallback network
# config (DHCP on the first NIC).
cat >"$ROOT/etc/cloud/ds-identify.cfg" <<'EOF'
policy: search,found=all,maybe=all,notfound=enabled
EOF

# C.UTF-8 needs no locale-gen: cloud-init's locale module finds it set and does nothing.
echo 'LANG=C.UTF-8' >"$ROOT/etc/default/locale"

# sshd: host keys are made on first boot by cloud-init's ssh module (ed25519 and ecdsa,
# see above; an ed25519 key here if cloud-init made none), never shipped in the image.
rm -f "$ROOT"/etc/ssh/ssh_host_*
mkdir -p "$ROOT/etc/systemd/system/ssh.service.d"
cat >"$ROOT/etc/systemd/system/ssh.service.d/vigil-hostkeys.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
EOF

# Units: cloud-init's four stages, a getty on the serial console. qemu-guest-agent has no
# [Install] section: udev starts it (60-qemu-guest-agent.rules, TAG+="systemd") when its
# virtio port appears, which needs the udev package (installed above).
chroot "$ROOT" systemctl enable cloud-init-local.service cloud-init.service \
	cloud-config.service cloud-final.service serial-getty@ttyS0.service >/dev/null 2>&1 ||
	die "systemctl enable failed in the chroot"
# Test guests run under TCG: no background apt runs while tests measure, and no e2scrub
# (it only acts on LVM volumes, but its reaper took 20 s of CPU at first boot).
chroot "$ROOT" systemctl disable apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
	e2scrub_reap.service >/dev/null 2>&1 || true
[ -f "$ROOT/lib/udev/rules.d/60-qemu-guest-agent.rules" ] || die "qemu-guest-agent's udev rule is missing"

# Each VM gets its own machine id on first boot.
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
ln -s /etc/machine-id "$ROOT/var/lib/dbus/machine-id"

# Boot loader configuration (GRUB i386-pc; the image itself is installed in step 4).
mkdir -p "$ROOT/boot/grub"
cp -a "$ROOT/usr/lib/grub/i386-pc" "$ROOT/boot/grub/"
cat >"$ROOT/boot/grub/grub.cfg" <<EOF
# Written by Vigil's build-debian-image.sh. /vmlinuz and /initrd.img are Debian's
# symlinks to the newest kernel, so this keeps working after kernel upgrades.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
set default=0
menuentry 'Debian GNU/Linux 12' {
	search --no-floppy --fs-uuid --set=root $FS_UUID
	linux /vmlinuz $CMDLINE
	initrd /initrd.img
}
menuentry 'Debian GNU/Linux 12 (previous kernel)' {
	search --no-floppy --fs-uuid --set=root $FS_UUID
	linux /vmlinuz.old $CMDLINE
	initrd /initrd.img.old
}
EOF

# Trim what a VM image does not need.
chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/debconf/*-old \
	"$ROOT"/var/log/*.log "$ROOT"/var/log/apt/* "$ROOT"/tmp/* "$ROOT"/var/tmp/* \
	"$ROOT"/var/lib/cloud/* "$ROOT"/root/.bash_history
find "$ROOT/var/log" -type f -name '*.gz' -delete

# --- 3. root file system ------------------------------------------------------------------
PART_SECTORS=$((DISK_BYTES / 512 - PART_START))
log "making ext4 ($((PART_SECTORS / 2048)) MiB, UUID $FS_UUID) from the chroot"
# Keep features that bookworm's GRUB 2.06 reads: no metadata_csum_seed; no orphan_file
# (mke2fs >= 1.47 elsewhere may enable them by default).
mkfs_opts=(-O '^metadata_csum_seed')
mke2fs_version=$(mke2fs -V 2>&1 || true)
if [[ $mke2fs_version =~ mke2fs\ 1\.(4[7-9]|[5-9][0-9]) ]]; then
	mkfs_opts=(-O '^metadata_csum_seed,^orphan_file')
fi
truncate -s $((PART_SECTORS * 512)) "$WORK/part.img"
mke2fs -q -F -t ext4 -L root -U "$FS_UUID" -m 1 "${mkfs_opts[@]}" -d "$ROOT" "$WORK/part.img" ||
	die "mke2fs -d failed"
fsck_out=$(e2fsck -fn "$WORK/part.img" 2>&1) || {
	echo "$fsck_out" >&2
	die "e2fsck found errors in the new file system"
}

# --- 4. boot loader and disk --------------------------------------------------------------
log "installing GRUB (i386-pc) into the MBR and the post-MBR gap"
cat >"$ROOT/tmp/early.cfg" <<EOF
search --no-floppy --fs-uuid --set=root $FS_UUID
set prefix=(\$root)/boot/grub
EOF
chroot "$ROOT" grub-mkimage -O i386-pc -o /tmp/core.img -c /tmp/early.cfg -p /boot/grub \
	biosdisk part_msdos ext2 search search_fs_uuid normal linux echo test configfile \
	serial terminal || die "grub-mkimage failed"
CORE=$ROOT/tmp/core.img
core_sectors=$((($(stat -c %s "$CORE") + 511) / 512))
[ $core_sectors -lt $((PART_START - 1)) ] || die "core.img ($core_sectors sectors) does not fit before the partition"
# diskboot.img (core.img's first sector) loads the rest of core.img from the block list at
# its end; grub-mkimage fills in the length, the default start is sector 2 = right after it.
[ "$(od -An -tu4 -j $((0x200 - 12)) -N 4 "$CORE" | tr -d ' ')" = 2 ] ||
	die "unexpected block list in core.img"

# bytes as \xHH escapes for printf %b
hexb() { printf '\\x%02x' "$@"; }
le32() { hexb $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)); }
chs() { # LBA -> the 3 CHS bytes with 255 heads / 63 sectors, clamped at cylinder 1023
	local lba=$1 c h s
	c=$((lba / (255 * 63)))
	h=$(((lba / 63) % 255))
	s=$((lba % 63 + 1))
	if [ $c -gt 1023 ]; then c=1023 h=254 s=63; fi
	hexb $h $((s | ((c >> 2) & 0xc0))) $((c & 255))
}
DISK=$WORK/disk.raw
truncate -s "$DISK_BYTES" "$DISK"
# MBR: GRUB's boot.img code (first 440 bytes), disk signature, one active Linux partition.
dd if="$ROOT/usr/lib/grub/i386-pc/boot.img" of="$DISK" bs=440 count=1 conv=notrunc status=none
# boot.img jumps over its "trust the BIOS drive number?" test unless patched to NOPs
# (what grub-bios-setup does for hard disks).
[ "$(od -An -tx1 -j $((0x66)) -N 1 "$DISK" | tr -d ' ')" = eb ] || die "unexpected boot.img"
printf '\x90\x90' | dd of="$DISK" bs=1 seek=$((0x66)) conv=notrunc status=none
sig=$((0x${FS_UUID:0:8}))
printf '%b' "$(le32 $sig)\\x00\\x00" | dd of="$DISK" bs=1 seek=440 conv=notrunc status=none
entry="\\x80$(chs $PART_START)\\x83$(chs $((PART_START + PART_SECTORS - 1)))"
entry+="$(le32 $PART_START)$(le32 $PART_SECTORS)"
printf '%b' "$entry" | dd of="$DISK" bs=1 seek=446 conv=notrunc status=none
printf '\x55\xaa' | dd of="$DISK" bs=1 seek=510 conv=notrunc status=none
dd if="$CORE" of="$DISK" bs=512 seek=1 conv=notrunc status=none
dd if="$WORK/part.img" of="$DISK" bs=1M seek=$((PART_START / 2048)) conv=notrunc,sparse status=none
rm -f "$WORK/part.img"

log "writing compressed qcow2"
rm -f "$IMAGE.tmp"
qemu-img convert -c -f raw -O qcow2 "$DISK" "$IMAGE.tmp" || die "qemu-img convert failed"
mv -f "$IMAGE.tmp" "$IMAGE"
echo "$HASH" >"$STAMP"
log "done in $(($(date +%s) - START)) s: $IMAGE ($(du -h "$IMAGE" | cut -f1) on disk, 2 GiB virtual; kernel $KVER)"
