// Package iso9660 writes small ISO 9660 (ECMA-119) images with Rock Ridge
// names: enough for a cloud-init NoCloud seed (volume "cidata") and similar
// small volumes handed to a guest as a CD-ROM or disk.
//
// What is written, and why:
//
//   - One root directory and no subdirectories. Each file's data is one
//     contiguous extent starting on its own 2048-byte sector.
//   - Level 1 ISO 9660 identifiers (8.3, upper case, ";1") derived from the
//     real names, because every record needs a valid ISO name even when
//     readers show another one.
//   - Rock Ridge (SUSP 1.10 and RRIP 1.10, "RRIP_1991A"): an NM entry with
//     the real name and a PX entry with read-only POSIX modes on every
//     record. The names cloud-init reads ("meta-data", "user-data",
//     "network-config") are not valid ISO 9660 names, and Linux's isofs
//     driver shows Rock Ridge names by default.
//   - No Joliet: Linux prefers Rock Ridge when both exist, and without a
//     Joliet descriptor blkid takes LABEL straight from the primary volume
//     descriptor.
//   - The volume identifier verbatim, lower case included: blkid reports it
//     as LABEL and cloud-init looks for LABEL=cidata.
//
// The image is a pure function of its inputs (no clock is read), so equal
// inputs give byte-identical images.
package iso9660

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Limits of what Write accepts.
const (
	// SectorSize is the ISO 9660 logical block size used for everything.
	SectorSize = 2048
	// MaxImageSize bounds the whole image: the package is meant for seeds
	// and small configuration volumes, which it builds in memory.
	MaxImageSize = 16 << 20
	// MaxFiles bounds the number of files, which keeps the search for
	// unique 8.3 names cheap.
	MaxFiles = 1024
	// MaxNameLen bounds a file name in bytes. A directory record holds at
	// most 255 bytes; with the 8.3 name and the PX entry that leaves room
	// for a name of about 165 bytes in one NM entry. Longer names would
	// need a continuation area per file, which nothing here needs.
	MaxNameLen = 128
	// MaxVolumeIDLen is the size of the volume identifier field.
	MaxVolumeIDLen = 32
)

// Fixed layout. Everything before the file data fits in known sectors
// except the root directory, which comes last so it can grow.
const (
	pvdSector        = 16 // sectors 0-15 are the system area, left zero
	terminatorSector = 17
	lPathTableSector = 18
	mPathTableSector = 19
	ceSector         = 20 // continuation area holding the ER entry
	rootSector       = 21
)

// File is a regular file in the root directory.
type File struct {
	// Name is the name readers with Rock Ridge show: any UTF-8 without
	// '/', NUL or control characters, at most MaxNameLen bytes, not "."
	// or "..".
	Name string
	Data []byte
}

// Image describes a volume to write.
type Image struct {
	// VolumeID is recorded as is (blkid's LABEL): 1 to 32 bytes of
	// printable ASCII, not starting or ending with a space.
	VolumeID string
	// Files go in the root directory, in any order; names must be unique.
	Files []File
	// ModTime is recorded as the volume's creation and modification time
	// and as every record's date. The zero value records "not specified",
	// which keeps callers that want reproducible images free of the clock.
	// Otherwise the year must be within 1900-2155, the range a directory
	// record can hold.
	ModTime time.Time
}

// Write writes an image with the given volume identifier and root files,
// with unspecified dates. See Image for the rules on each argument.
func Write(w io.Writer, volumeID string, files []File) error {
	_, err := Image{VolumeID: volumeID, Files: files}.WriteTo(w)
	return err
}

// entry is a file together with where the image puts it.
type entry struct {
	File
	base, ext string // level 1 ISO name parts
	extent    uint32
}

// WriteTo writes the image to w and returns the number of bytes written.
// Invalid contents are refused with ErrInvalid and oversized ones with
// ErrTooLarge before anything is written.
func (im Image) WriteTo(w io.Writer) (int64, error) {
	if err := checkVolumeID(im.VolumeID); err != nil {
		return 0, err
	}
	if !im.ModTime.IsZero() {
		if y := im.ModTime.UTC().Year(); y < 1900 || y > 2155 {
			return 0, fmt.Errorf("%w: modification time %s outside the years 1900-2155", ErrInvalid, im.ModTime.UTC().Format(time.RFC3339))
		}
	}
	entries, err := makeEntries(im.Files)
	if err != nil {
		return 0, err
	}

	// Record lengths do not depend on extents, so the directory can be laid
	// out first and the file data placed after it.
	dot := dotRecord(0, 0, im.ModTime)
	dotdot := dotdotRecord(0, 0, im.ModTime)
	lens := []int{len(dot), len(dotdot)}
	for i := range entries {
		lens = append(lens, len(fileRecord(&entries[i], im.ModTime)))
	}
	dirSectors := packSectors(lens)
	dirSize := uint32(dirSectors * SectorSize)

	next := uint64(rootSector + dirSectors)
	for i := range entries {
		// An empty file gets the next free sector as its extent but uses
		// none, so every extent points inside or just after the data.
		entries[i].extent = uint32(min(next, 1<<32-1))
		next += sectorsFor(len(entries[i].Data))
	}
	if next*SectorSize > MaxImageSize {
		return 0, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, next*SectorSize, MaxImageSize)
	}
	total := uint32(next)

	meta := make([]byte, (rootSector+dirSectors)*SectorSize)
	putPVD(meta[pvdSector*SectorSize:], im, total, dirSize)
	putTerminator(meta[terminatorSector*SectorSize:])
	putPathTables(meta[lPathTableSector*SectorSize:], meta[mPathTableSector*SectorSize:])
	copy(meta[ceSector*SectorSize:], erEntry())

	records := [][]byte{dotRecord(rootSector, dirSize, im.ModTime), dotdotRecord(rootSector, dirSize, im.ModTime)}
	for i := range entries {
		records = append(records, fileRecord(&entries[i], im.ModTime))
	}
	putDirectory(meta[rootSector*SectorSize:], records)

	cw := &countWriter{w: w}
	cw.write(meta)
	for _, e := range entries {
		cw.write(e.Data)
		if pad := int(sectorsFor(len(e.Data))*SectorSize) - len(e.Data); pad > 0 {
			cw.write(make([]byte, pad))
		}
	}
	if cw.err != nil {
		return cw.n, fmt.Errorf("write iso9660 image: %w", cw.err)
	}
	return cw.n, nil
}

func checkVolumeID(id string) error {
	if id == "" || len(id) > MaxVolumeIDLen {
		return fmt.Errorf("%w: volume id %q must be 1 to %d bytes", ErrInvalid, id, MaxVolumeIDLen)
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x20 || id[i] > 0x7e {
			return fmt.Errorf("%w: volume id %q must be printable ASCII", ErrInvalid, id)
		}
	}
	// The field is padded with spaces, so outer spaces could not be told
	// apart from padding when read back.
	if id[0] == ' ' || id[len(id)-1] == ' ' {
		return fmt.Errorf("%w: volume id %q must not start or end with a space", ErrInvalid, id)
	}
	return nil
}

func checkName(name string) error {
	switch {
	case name == "" || len(name) > MaxNameLen:
		return fmt.Errorf("%w: file name %q must be 1 to %d bytes", ErrInvalid, name, MaxNameLen)
	case name == "." || name == "..":
		return fmt.Errorf("%w: file name %q is reserved", ErrInvalid, name)
	case !utf8.ValidString(name):
		return fmt.Errorf("%w: file name %q is not UTF-8", ErrInvalid, name)
	case strings.ContainsRune(name, '/'):
		return fmt.Errorf("%w: file name %q contains '/': only the root directory is supported", ErrInvalid, name)
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("%w: file name %q contains a control character", ErrInvalid, name)
		}
	}
	return nil
}

// makeEntries validates the files, gives each a unique level 1 name and
// sorts them in the order ECMA-119 9.3 requires for directory records.
func makeEntries(files []File) ([]entry, error) {
	if len(files) > MaxFiles {
		return nil, fmt.Errorf("%w: %d files, limit %d", ErrTooLarge, len(files), MaxFiles)
	}
	seen := make(map[string]bool, len(files))
	used := make(map[string]bool, len(files))
	entries := make([]entry, 0, len(files))
	for _, f := range files {
		if err := checkName(f.Name); err != nil {
			return nil, err
		}
		if seen[f.Name] {
			return nil, fmt.Errorf("%w: duplicate file name %q", ErrInvalid, f.Name)
		}
		seen[f.Name] = true
		if len(f.Data) > MaxImageSize {
			return nil, fmt.Errorf("%w: file %q has %d bytes, limit %d", ErrTooLarge, f.Name, len(f.Data), MaxImageSize)
		}
		base, ext := uniqueISOName(f.Name, used)
		entries = append(entries, entry{File: f, base: base, ext: ext})
	}
	slices.SortFunc(entries, func(a, b entry) int {
		// Shorter parts compare as if padded with spaces (ECMA-119 9.3).
		if c := strings.Compare(padRight(a.base, 8), padRight(b.base, 8)); c != 0 {
			return c
		}
		return strings.Compare(padRight(a.ext, 3), padRight(b.ext, 3))
	})
	return entries, nil
}

// uniqueISOName maps a name to a level 1 name (up to 8 d-characters, a
// dot, up to 3 d-characters) not yet in used, and records it there.
func uniqueISOName(name string, used map[string]bool) (base, ext string) {
	stem := name
	if i := strings.LastIndexByte(name, '.'); i > 0 {
		stem, ext = name[:i], name[i+1:]
	}
	base, ext = dChars(stem, 8), dChars(ext, 3)
	if base == "" {
		base = "_"
	}
	if key := base + "." + ext; !used[key] {
		used[key] = true
		return base, ext
	}
	// Replace the tail with a counter; at most MaxFiles tries are needed.
	for n := 1; ; n++ {
		suffix := strconv.Itoa(n)
		b := base
		if len(b)+len(suffix) > 8 {
			b = b[:8-len(suffix)]
		}
		b += suffix
		if key := b + "." + ext; !used[key] {
			used[key] = true
			return b, ext
		}
	}
}

// dChars keeps up to max characters of s as d-characters (A-Z, 0-9, _),
// upper-casing letters and replacing anything else with '_'.
func dChars(s string, max int) string {
	var b strings.Builder
	for i := 0; i < len(s) && b.Len() < max; i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z':
			b.WriteByte(c - 'a' + 'A')
		case c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_':
			b.WriteByte(c)
		default:
			b.WriteByte('_')
		}
	}
	return b.String()
}

func padRight(s string, n int) string {
	if len(s) >= n {
		return s
	}
	return s + strings.Repeat(" ", n-len(s))
}

func sectorsFor(n int) uint64 {
	return uint64((n + SectorSize - 1) / SectorSize)
}

// packSectors returns how many sectors the records need, given that a
// record never crosses a sector boundary (ECMA-119 6.8.1.1).
func packSectors(lens []int) int {
	sectors, used := 1, 0
	for _, l := range lens {
		if used+l > SectorSize {
			sectors++
			used = 0
		}
		used += l
	}
	return sectors
}

func putDirectory(dst []byte, records [][]byte) {
	off := 0
	for _, r := range records {
		if off%SectorSize+len(r) > SectorSize {
			off += SectorSize - off%SectorSize // rest of the sector stays zero
		}
		off += copy(dst[off:], r)
	}
}

// POSIX modes recorded in PX entries: everything read-only, since the
// volume cannot be written anyway.
const (
	modeDir  = 0o040555
	modeFile = 0o100444
)

const flagDirectory = 0x02

func dotRecord(extent, size uint32, t time.Time) []byte {
	su := slices.Concat(spEntry(), pxEntry(modeDir, 2), ceEntry(ceSector, 0, uint32(len(erEntry()))))
	return dirRecord([]byte{0}, extent, size, flagDirectory, t, su)
}

func dotdotRecord(extent, size uint32, t time.Time) []byte {
	return dirRecord([]byte{1}, extent, size, flagDirectory, t, pxEntry(modeDir, 2))
}

func fileRecord(e *entry, t time.Time) []byte {
	ident := []byte(e.base + "." + e.ext + ";1")
	su := slices.Concat(pxEntry(modeFile, 1), nmEntry(e.Name))
	return dirRecord(ident, e.extent, uint32(len(e.Data)), 0, t, su)
}

// dirRecord builds a directory record (ECMA-119 9.1) with the given system
// use area, padded to an even length.
func dirRecord(ident []byte, extent, size uint32, flags byte, t time.Time, systemUse []byte) []byte {
	n := 33 + len(ident)
	if n%2 == 1 {
		n++ // padding field after an even-length identifier
	}
	suOff := n
	n += len(systemUse)
	if n%2 == 1 {
		n++
	}
	r := make([]byte, n)
	r[0] = byte(n)
	putBoth32(r[2:], extent)
	putBoth32(r[10:], size)
	putRecordDate(r[18:25], t)
	r[25] = flags
	putBoth16(r[28:], 1) // volume sequence number
	r[32] = byte(len(ident))
	copy(r[33:], ident)
	copy(r[suOff:], systemUse)
	return r
}

// System Use Sharing Protocol and Rock Ridge entries: two signature
// bytes, the entry length, the version (1), then the data.

func spEntry() []byte {
	// Check bytes BE EF, and no bytes to skip in later records.
	return []byte{'S', 'P', 7, 1, 0xbe, 0xef, 0}
}

func ceEntry(extent, offset, length uint32) []byte {
	e := make([]byte, 28)
	copy(e, []byte{'C', 'E', 28, 1})
	putBoth32(e[4:], extent)
	putBoth32(e[12:], offset)
	putBoth32(e[20:], length)
	return e
}

// The ER entry names the extension, so readers know the PX/NM entries are
// Rock Ridge. These are the RRIP 1.10 texts that mkisofs writes too; some
// readers (libisofs) only accept known identifiers.
const (
	erID     = "RRIP_1991A"
	erDesc   = "THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS"
	erSource = "PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION."
)

// erEntry is too long to share the '.' record with SP and PX, so it lives
// in the continuation area that the '.' record's CE entry points to.
func erEntry() []byte {
	n := 8 + len(erID) + len(erDesc) + len(erSource)
	return slices.Concat(
		[]byte{'E', 'R', byte(n), 1, byte(len(erID)), byte(len(erDesc)), byte(len(erSource)), 1},
		[]byte(erID), []byte(erDesc), []byte(erSource))
}

// pxEntry is the RRIP 1.10 form (36 bytes, no inode number field), the
// one that matches the RRIP_1991A identifier.
func pxEntry(mode, nlink uint32) []byte {
	e := make([]byte, 36)
	copy(e, []byte{'P', 'X', 36, 1})
	putBoth32(e[4:], mode)
	putBoth32(e[12:], nlink)
	// uid and gid stay 0 (root).
	return e
}

func nmEntry(name string) []byte {
	return slices.Concat([]byte{'N', 'M', byte(5 + len(name)), 1, 0}, []byte(name))
}

func putPVD(s []byte, im Image, totalSectors, rootSize uint32) {
	s[0] = 1 // primary volume descriptor
	copy(s[1:6], "CD001")
	s[6] = 1
	fillSpaces(s[8:40]) // system identifier
	fillSpaces(s[40:72])
	copy(s[40:72], im.VolumeID)
	putBoth32(s[80:], totalSectors)
	putBoth16(s[120:], 1) // volume set size
	putBoth16(s[124:], 1) // volume sequence number
	putBoth16(s[128:], SectorSize)
	putBoth32(s[132:], pathTableSize)
	binary.LittleEndian.PutUint32(s[140:], lPathTableSector)
	binary.BigEndian.PutUint32(s[148:], mPathTableSector)
	copy(s[156:190], dirRecord([]byte{0}, rootSector, rootSize, flagDirectory, im.ModTime, nil))
	// Volume set, publisher, data preparer and application identifiers,
	// then the copyright, abstract and bibliographic file identifiers.
	fillSpaces(s[190:813])
	putVolumeDate(s[813:830], im.ModTime)  // creation
	putVolumeDate(s[830:847], im.ModTime)  // modification
	putVolumeDate(s[847:864], time.Time{}) // expiration: never
	putVolumeDate(s[864:881], time.Time{}) // effective: at once
	s[881] = 1                             // file structure version
}

func putTerminator(s []byte) {
	s[0] = 255
	copy(s[1:6], "CD001")
	s[6] = 1
}

// The path tables list directories; with only the root they have one
// 10-byte record each: identifier length 1, location, parent 1, name 0x00.
const pathTableSize = 10

func putPathTables(l, m []byte) {
	l[0], m[0] = 1, 1
	binary.LittleEndian.PutUint32(l[2:], rootSector)
	binary.BigEndian.PutUint32(m[2:], rootSector)
	binary.LittleEndian.PutUint16(l[6:], 1)
	binary.BigEndian.PutUint16(m[6:], 1)
}

// putRecordDate writes the 7-byte date of a directory record (ECMA-119
// 9.1.5); all zero means not specified.
func putRecordDate(b []byte, t time.Time) {
	if t.IsZero() {
		return
	}
	t = t.UTC()
	b[0] = byte(t.Year() - 1900)
	b[1] = byte(t.Month())
	b[2] = byte(t.Day())
	b[3] = byte(t.Hour())
	b[4] = byte(t.Minute())
	b[5] = byte(t.Second())
	b[6] = 0 // offset from GMT in 15-minute steps
}

// putVolumeDate writes the 17-byte date of a volume descriptor (ECMA-119
// 8.4.26.1): sixteen digits and a GMT offset; all '0' digits and a zero
// offset mean not specified.
func putVolumeDate(b []byte, t time.Time) {
	if t.IsZero() {
		copy(b, "0000000000000000")
		b[16] = 0
		return
	}
	t = t.UTC()
	copy(b, fmt.Sprintf("%04d%02d%02d%02d%02d%02d%02d",
		t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), t.Nanosecond()/1e7))
	b[16] = 0
}

func fillSpaces(b []byte) {
	copy(b, bytes.Repeat([]byte{' '}, len(b)))
}

// ECMA-119 stores most numbers twice, little-endian then big-endian
// ("both-byte orders", 7.2.3 and 7.3.3).

func putBoth16(b []byte, v uint16) {
	binary.LittleEndian.PutUint16(b, v)
	binary.BigEndian.PutUint16(b[2:], v)
}

func putBoth32(b []byte, v uint32) {
	binary.LittleEndian.PutUint32(b, v)
	binary.BigEndian.PutUint32(b[4:], v)
}

// countWriter keeps the first error and the bytes written, so the write
// loop needs no error check per call.
type countWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *countWriter) write(p []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
}
