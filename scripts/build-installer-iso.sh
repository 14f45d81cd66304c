#!/usr/bin/env bash
# build-installer-iso.sh OUT_DIR
#
# Builds OUT_DIR/debian-installer.iso: a small BIOS-bootable ISO (El Torito, isolinux; also
# isohybrid, so it boots when written to a disk) that starts the Debian 12 text-mode
# installer on the serial console. It is a test fixture: a guest that boots from a CD-ROM,
# shows a recognisable first dialog on ttyS0 and then waits for input forever.
#
# What is on it
#   - /install/vmlinuz, /install/initrd.gz: the netboot installer's kernel and initrd from
#     Debian's package debian-installer-12-netboot-amd64 (the "text" flavour).
#   - /isolinux/isolinux.bin (package isolinux) and /isolinux/ldlinux.c32 (package
#     syslinux-common, the same syslinux version), /isolinux/isolinux.cfg: no menu, boots
#     at once with "console=ttyS0,115200n8 DEBIAN_FRONTEND=text". isolinux itself also
#     prints to ttyS0 ("ISOLINUX 6.04 ...").
#
# On the serial console: ISOLINUX's banner, the kernel log ("Linux version 6.1.0-..."; ~5-10 s
# after QEMU starts under TCG), then the installer (run inside GNU screen, whose status-line
# escape codes come first) shows its first dialog ~35-50 s after QEMU starts, as plain lines:
#   Select a language
#   -----------------
#   Choose the language to be used for the installation process. The selected
#   ...
#   Prompt: '?' for help, default=2>
# and then waits for input forever.
#
# Cache: OUT_DIR/debian-installer.stamp holds the SHA-256 of this script and the version
# of debian-installer-12-netboot-amd64. When both match and the ISO exists the script
# exits at once, so tests may call it on every run.
#
# Needs these Debian packages (missing ones are installed with apt-get when run as root):
# debian-installer-12-netboot-amd64, isolinux, syslinux-common, xorriso.
#
# Booting it by hand (TCG):
#   qemu-system-x86_64 -machine q35 -accel tcg -m 1024 -nographic \
#     -drive file=debian-installer.iso,if=none,id=cd,media=cdrom,readonly=on \
#     -device ide-cd,bus=ide.0,drive=cd
set -euo pipefail

PROG=build-installer-iso
DI_PKG=debian-installer-12-netboot-amd64
DI_DIR=/usr/lib/debian-installer/images/12/amd64/text/debian-installer/amd64
CMDLINE="console=ttyS0,115200n8 DEBIAN_FRONTEND=text"

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
ISO=$OUT_DIR/debian-installer.iso
STAMP=$OUT_DIR/debian-installer.stamp
SELF=$(readlink -f "${BASH_SOURCE[0]}")
HASH=$(sha256sum "$SELF" | cut -d' ' -f1)

wanted() { echo "$HASH $(dpkg-query -W -f='${Version}' "$DI_PKG" 2>/dev/null || echo none)"; }
up_to_date() { [ -s "$ISO" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(wanted)" ]; }
if up_to_date; then
	log "$ISO is up to date"
	exit 0
fi

# One build at a time per OUT_DIR; a second caller waits and then finds the ISO.
exec 9>"$OUT_DIR/.debian-installer.lock"
flock 9
if up_to_date; then
	log "$ISO is up to date"
	exit 0
fi
START=$(date +%s)

# --- host packages ------------------------------------------------------------------------
need=()
[ -f "$DI_DIR/linux" ] && [ -f "$DI_DIR/initrd.gz" ] || need+=("$DI_PKG")
[ -f /usr/lib/ISOLINUX/isolinux.bin ] || need+=(isolinux)
[ -f /usr/lib/syslinux/modules/bios/ldlinux.c32 ] || need+=(syslinux-common)
command -v xorriso >/dev/null || need+=(xorriso)
if [ ${#need[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || die "missing Debian packages (run as root to install them): ${need[*]}"
	log "installing host packages: ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	# apt-get update only when the package lists do not have them (or are stale).
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
		apt-get update -qq || die "apt-get update failed"
		apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
			die "apt-get install ${need[*]} failed"
	}
fi
[ -f "$DI_DIR/linux" ] && [ -f "$DI_DIR/initrd.gz" ] ||
	die "no installer kernel/initrd in $DI_DIR (dpkg -L $DI_PKG)"

# --- temp dir and cleanup -----------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/vigil-installer-iso.XXXXXX")
cleanup() {
	local rc=$?
	rm -rf "$WORK" "$ISO.tmp"
	[ $rc -eq 0 ] || log "FAILED (exit $rc); no ISO written"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tree and ISO -------------------------------------------------------------------------
TREE=$WORK/tree
mkdir -p "$TREE/isolinux" "$TREE/install"
cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$TREE/isolinux/"
cp "$DI_DIR/linux" "$TREE/install/vmlinuz"
cp "$DI_DIR/initrd.gz" "$TREE/install/initrd.gz"
cat >"$TREE/isolinux/isolinux.cfg" <<EOF
# Written by Vigil's build-installer-iso.sh: no menu, boot the installer at once.
serial 0 115200
default install
prompt 0
timeout 1
label install
	kernel /install/vmlinuz
	append initrd=/install/initrd.gz $CMDLINE
EOF

log "writing $ISO"
xorriso -as mkisofs -o "$ISO.tmp" -V VIGIL_DI -J -r \
	-isohybrid-mbr /usr/lib/ISOLINUX/isohdpfx.bin \
	-b isolinux/isolinux.bin -c isolinux/boot.cat \
	-no-emul-boot -boot-load-size 4 -boot-info-table \
	"$TREE" >"$WORK/xorriso.log" 2>&1 || {
	cat "$WORK/xorriso.log" >&2
	die "xorriso failed"
}
xorriso -indev "$ISO.tmp" -report_el_torito plain 2>/dev/null | grep -q 'El Torito boot img' ||
	die "the new ISO has no El Torito boot image"
mv -f "$ISO.tmp" "$ISO"
wanted >"$STAMP"
log "done in $(($(date +%s) - START)) s: $ISO ($(du -h "$ISO" | cut -f1); $DI_PKG $(dpkg-query -W -f='${Version}' "$DI_PKG"))"
