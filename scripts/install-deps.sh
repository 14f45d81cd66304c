#!/usr/bin/env bash
# Installs the Debian packages Vigil needs, only when something is missing;
# with --test, also what its tests need; with --bench, what make bench
# measures against.
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
[ -x /bin/busybox ] && file_is_static=$(LC_ALL=C ldd /bin/busybox 2>&1 | grep -c "not a dynamic" || true) || file_is_static=0
[ "${file_is_static}" = 1 ] || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v curl >/dev/null || need+=(curl)
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || need+=(ovmf)
if [ "${1:-}" = --test ]; then
	# The real qemu-guest-agent the qga tests talk to; tools that check the
	# cloud-init volumes Vigil writes.
	[ -x /usr/sbin/qemu-ga ] || need+=(qemu-guest-agent)
	command -v isoinfo >/dev/null || need+=(genisoimage)
	command -v xorriso >/dev/null || need+=(xorriso)
	# The network tests' client namespace (ip netns); iperf3 for make bench.
	command -v ip >/dev/null || need+=(iproute2)
	command -v iperf3 >/dev/null || need+=(iperf3)
	# promtool checks the /metrics text; it comes in Debian's prometheus
	# package, whose server is of no use here (and would listen on :9090):
	# only the tool is unpacked.
	command -v promtool >/dev/null || want_promtool=1
fi
if [ "${1:-}" = --test ] || [ "${1:-}" = --bench ]; then
	# The dashboard's browser tests and its benchmark drive a real
	# headless Chromium.
	command -v chromium >/dev/null || need+=(chromium)
fi
if [ "${1:-}" = --bench ]; then
	# make bench measures libvirt beside Vigil (a system libvirtd it starts
	# and stops itself: these machines have no systemd).
	command -v libvirtd >/dev/null || need+=(libvirt-daemon-system)
	command -v virsh >/dev/null || need+=(libvirt-clients)
fi
if [ ${#need[@]} -eq 0 ] && [ -z "${want_promtool:-}" ]; then
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	SUDO=sudo
else
	SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
	echo "installing: ${need[*]}"
	$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ -n "${want_promtool:-}" ]; then
	echo "installing: promtool (from Debian's prometheus package, unpacked)"
	tmp=$(mktemp -d)
	(cd "$tmp" && apt-get download -qq prometheus 2>/dev/null && dpkg -x prometheus_*.deb x)
	$SUDO install -m 0755 "$tmp/x/usr/bin/promtool" /usr/local/bin/promtool
	rm -rf "$tmp"
fi
