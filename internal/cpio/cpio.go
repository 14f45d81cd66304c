// Package cpio writes the "newc" cpio archives the Linux kernel unpacks as
// an initramfs, and reads them back (for checks and tests).
package cpio

import (
	"fmt"
	"io"
	"io/fs"
	"strconv"
)

// Writer writes the "newc" (SVR4, no CRC) cpio format that the Linux
// kernel unpacks as an initramfs. Writing it here rather than shelling out to
// cpio(1) keeps the archive byte-for-byte reproducible (fixed inode numbers,
// owners and mtimes) and lets us add device nodes without being root.
type Writer struct {
	w   io.Writer
	ino uint32
	off int64
	err error
}

func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// Mode bits as used in the cpio header (same values as Linux st_mode).
const (
	ModeDir     = 0o040000
	ModeFile    = 0o100000
	ModeSymlink = 0o120000
	ModeCharDev = 0o020000
)

const trailer = "TRAILER!!!"

// mtime is a fixed timestamp so that identical inputs give identical
// archives.
const mtime = 1_700_000_000

func (c *Writer) header(name string, mode uint32, size int, rdevMajor, rdevMinor uint32) {
	if c.err != nil {
		return
	}
	c.ino++
	nlink := uint32(1)
	if mode&0o170000 == ModeDir {
		nlink = 2
	}
	if name == trailer {
		c.ino, nlink = 0, 1
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name + "\x00"))
	c.pad()
}

func (c *Writer) write(b []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(b)
	c.off += int64(n)
	if err != nil {
		c.err = fmt.Errorf("write cpio: %w", err)
	}
}

// pad aligns the stream to 4 bytes, as newc requires after names and data.
func (c *Writer) pad() {
	if r := c.off % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

// Dir adds a directory. Names are relative to the archive root ("bin").
func (c *Writer) Dir(name string, perm fs.FileMode) {
	c.header(name, ModeDir|uint32(perm.Perm()), 0, 0, 0)
}

// File adds a regular file.
func (c *Writer) File(name string, perm fs.FileMode, data []byte) {
	c.header(name, ModeFile|uint32(perm.Perm()), len(data), 0, 0)
	c.write(data)
	c.pad()
}

// Symlink adds a symbolic link to target.
func (c *Writer) Symlink(name, target string) {
	c.header(name, ModeSymlink|0o777, len(target), 0, 0)
	c.write([]byte(target))
	c.pad()
}

// CharDev adds a character device node.
func (c *Writer) CharDev(name string, perm fs.FileMode, major, minor uint32) {
	c.header(name, ModeCharDev|uint32(perm.Perm()), 0, major, minor)
}

// Close writes the trailer and reports the first error encountered. It does
// not close the underlying writer.
func (c *Writer) Close() error {
	c.header(trailer, 0, 0, 0, 0)
	return c.err
}

// Entry is one record of an archive, as Read returns it.
type Entry struct {
	Name       string
	Mode       uint32 // type and permission bits, as ModeFile|0o755
	Data       []byte // a file's content or a symlink's target
	Ino, Nlink uint32
	RMaj, RMin uint32
}

// Read parses a whole newc archive (without compression) up to its trailer.
func Read(b []byte) ([]Entry, error) {
	var out []Entry
	off := 0
	align := func() { off = (off + 3) &^ 3 }
	for {
		if off+110 > len(b) {
			return nil, fmt.Errorf("cpio: truncated header at %d", off)
		}
		h := string(b[off : off+110])
		if h[:6] != "070701" {
			return nil, fmt.Errorf("cpio: bad magic %q at %d", h[:6], off)
		}
		var fields [13]uint32
		for i := range fields {
			v, err := strconv.ParseUint(h[6+8*i:14+8*i], 16, 32)
			if err != nil {
				return nil, fmt.Errorf("cpio: bad header field %d at %d: %w", i, off, err)
			}
			fields[i] = uint32(v)
		}
		e := Entry{Ino: fields[0], Mode: fields[1], Nlink: fields[4], RMaj: fields[9], RMin: fields[10]}
		size, namesize := int(fields[6]), int(fields[11])
		off += 110
		if namesize < 1 || off+namesize > len(b) {
			return nil, fmt.Errorf("cpio: bad name size %d at %d", namesize, off)
		}
		if b[off+namesize-1] != 0 {
			return nil, fmt.Errorf("cpio: name at %d not NUL-terminated", off)
		}
		e.Name = string(b[off : off+namesize-1])
		off += namesize
		align()
		if size < 0 || off+size > len(b) {
			return nil, fmt.Errorf("cpio: %s: %d bytes of data past the end", e.Name, size)
		}
		e.Data = b[off : off+size]
		off += size
		align()
		if e.Name == trailer {
			if off != len(b) {
				return nil, fmt.Errorf("cpio: %d bytes after the trailer", len(b)-off)
			}
			return out, nil
		}
		out = append(out, e)
	}
}
