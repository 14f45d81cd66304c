package qemu

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// QEMU's file driver takes open file description (OFD) locks on bytes of
// the image: one byte per permission it holds (from 100) and one per
// permission it refuses to share (from 200). See block/file-posix.c.
const (
	lockBytesStart = 100
	lockBytesLen   = 200
)

// DiskInUse reports whether a QEMU (on this machine, or on another client
// of a shared file system that supports POSIX locks, such as NFSv4) has the
// image open. It asks the kernel whether a write lock over QEMU's lock bytes
// would conflict, without taking one. A second QEMU would fail to open the
// image anyway; checking first turns that into a clear refusal before any
// process is started.
func DiskInUse(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("check lock of %s: %w", path, err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: lockBytesStart, Len: lockBytesLen}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return false, fmt.Errorf("check lock of %s: %w", path, err)
	}
	return lk.Type != unix.F_UNLCK, nil
}
