package hostnet

import (
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// fakeNIC is a VM's end of a tap, held by the test: it reads and writes
// whole Ethernet frames, as QEMU would for a guest.
type fakeNIC struct {
	f   *os.File
	mac net.HardwareAddr
}

func openTap(t *testing.T, name string, mac net.HardwareAddr) *fakeNIC {
	t.Helper()
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open /dev/net/tun: %v", err)
	}
	var ifr [unix.IFNAMSIZ + 64]byte
	copy(ifr[:], name)
	binary.NativeEndian.PutUint16(ifr[unix.IFNAMSIZ:], unix.IFF_TAP|unix.IFF_NO_PI)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&ifr[0]))); errno != 0 {
		unix.Close(fd)
		t.Fatalf("attach to tap %s: %v", name, errno)
	}
	n := &fakeNIC{f: os.NewFile(uintptr(fd), name), mac: mac}
	t.Cleanup(func() { n.f.Close() })
	return n
}

func (n *fakeNIC) send(t *testing.T, frame []byte) {
	t.Helper()
	if _, err := n.f.Write(frame); err != nil {
		t.Fatalf("write to %s: %v", n.f.Name(), err)
	}
}

// await reads frames until match accepts one or the time is up.
func (n *fakeNIC) await(d time.Duration, match func(frame []byte) bool) bool {
	buf := make([]byte, 2048)
	deadline := time.Now().Add(d)
	_ = n.f.SetReadDeadline(deadline)
	for time.Now().Before(deadline) {
		k, err := n.f.Read(buf)
		if err != nil {
			if os.IsTimeout(err) {
				return false
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if match(buf[:k]) {
			return true
		}
	}
	return false
}

func ether(dst, src net.HardwareAddr, typ uint16, payload []byte) []byte {
	b := make([]byte, 14, 14+len(payload))
	copy(b, dst)
	copy(b[6:], src)
	binary.BigEndian.PutUint16(b[12:], typ)
	return append(b, payload...)
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

func ipv4Packet(src, dst netip.Addr, proto byte, payload []byte) []byte {
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(payload)))
	h[8] = 64
	h[9] = proto
	copy(h[12:], src.AsSlice())
	copy(h[16:], dst.AsSlice())
	binary.BigEndian.PutUint16(h[10:], checksum(h))
	return append(h, payload...)
}

func udpPacket(sport, dport uint16, payload []byte) []byte {
	h := make([]byte, 8)
	binary.BigEndian.PutUint16(h, sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint16(h[4:], uint16(8+len(payload)))
	return append(h, payload...) // checksum 0: none (allowed for IPv4)
}

func icmpEcho(id, seq uint16) []byte {
	b := make([]byte, 16)
	b[0] = 8
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	binary.BigEndian.PutUint16(b[2:], checksum(b))
	return b
}

func arpFrame(op uint16, sha net.HardwareAddr, spa netip.Addr, tha net.HardwareAddr, tpa netip.Addr) []byte {
	b := make([]byte, 28)
	binary.BigEndian.PutUint16(b, 1)
	binary.BigEndian.PutUint16(b[2:], etherTypeIPv4)
	b[4], b[5] = 6, 4
	binary.BigEndian.PutUint16(b[6:], op)
	copy(b[8:], sha)
	copy(b[14:], spa.AsSlice())
	copy(b[18:], tha)
	copy(b[24:], tpa.AsSlice())
	return b
}

// parsed views of received frames
func frameType(f []byte) uint16 {
	if len(f) < 14 {
		return 0
	}
	return binary.BigEndian.Uint16(f[12:])
}

// ipv4Of returns the IPv4 header fields and payload of a frame.
func ipv4Of(f []byte) (src, dst netip.Addr, proto byte, payload []byte, ok bool) {
	if frameType(f) != etherTypeIPv4 || len(f) < 34 {
		return
	}
	ip := f[14:]
	ihl := int(ip[0]&0xf) * 4
	if len(ip) < ihl {
		return
	}
	src, _ = netip.AddrFromSlice(ip[12:16])
	dst, _ = netip.AddrFromSlice(ip[16:20])
	return src, dst, ip[9], ip[ihl:], true
}

// arpOf returns an ARP frame's operation, sender and target addresses.
func arpOf(f []byte) (op uint16, sha net.HardwareAddr, spa, tpa netip.Addr, ok bool) {
	if frameType(f) != etherTypeARP || len(f) < 14+28 {
		return
	}
	a := f[14:]
	spa, _ = netip.AddrFromSlice(a[14:18])
	tpa, _ = netip.AddrFromSlice(a[24:28])
	return binary.BigEndian.Uint16(a[6:]), net.HardwareAddr(a[8:14]), spa, tpa, true
}
