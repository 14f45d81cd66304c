// Package isotest reads back the small ISO 9660 images that package
// iso9660 writes, for tests. It is strict on purpose: besides returning the
// volume identifier and the files under their Rock Ridge names, it fails on
// anything the writer promises not to do (mismatched both-endian copies,
// records crossing sectors, unsorted or non-level-1 identifiers, missing
// Rock Ridge markers, overlapping extents). It reads only a root directory.
package isotest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"
)

const sectorSize = 2048

// Volume is what Read found in an image.
type Volume struct {
	VolumeID string
	// Sectors is the volume space size from the primary volume descriptor.
	Sectors uint32
	// Created is the volume creation time; zero when not specified.
	Created time.Time
	// RockRidgeID is the extension identifier from the ER entry.
	RockRidgeID string
	// Files are the root directory's files in directory order.
	Files []File
}

// File is one root directory file.
type File struct {
	Name    string // from the Rock Ridge NM entry
	ISOName string // the ISO 9660 identifier, such as "META_DAT.;1"
	Mode    uint32 // from the Rock Ridge PX entry
	ModTime time.Time
	Extent  uint32
	Data    []byte
}

// ByName returns the file with the given Rock Ridge name.
func (v *Volume) ByName(name string) (File, bool) {
	for _, f := range v.Files {
		if f.Name == name {
			return f, true
		}
	}
	return File{}, false
}

// Read parses img, the whole image.
func Read(img []byte) (*Volume, error) {
	if len(img)%sectorSize != 0 || len(img) < 22*sectorSize {
		return nil, fmt.Errorf("image size %d is not a whole number of sectors past the descriptors", len(img))
	}
	pvd := img[16*sectorSize : 17*sectorSize]
	if pvd[0] != 1 || string(pvd[1:6]) != "CD001" || pvd[6] != 1 {
		return nil, errors.New("sector 16 is not a primary volume descriptor")
	}
	v := &Volume{VolumeID: strings.TrimRight(string(pvd[40:72]), " ")}
	var err error
	if v.Sectors, err = both32(pvd[80:]); err != nil {
		return nil, fmt.Errorf("volume space size: %w", err)
	}
	if int(v.Sectors)*sectorSize != len(img) {
		return nil, fmt.Errorf("volume space size %d sectors, image has %d", v.Sectors, len(img)/sectorSize)
	}
	for _, f := range []struct {
		name string
		off  int
		want uint16
	}{{"volume set size", 120, 1}, {"volume sequence number", 124, 1}, {"logical block size", 128, sectorSize}} {
		got, err := both16(pvd[f.off:])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f.name, err)
		}
		if got != f.want {
			return nil, fmt.Errorf("%s is %d, want %d", f.name, got, f.want)
		}
	}
	if pvd[881] != 1 {
		return nil, fmt.Errorf("file structure version %d", pvd[881])
	}
	if v.Created, err = volumeDate(pvd[813:830]); err != nil {
		return nil, fmt.Errorf("creation date: %w", err)
	}
	term := img[17*sectorSize:]
	if term[0] != 255 || string(term[1:6]) != "CD001" {
		return nil, errors.New("sector 17 is not a volume descriptor set terminator")
	}

	root, err := parseRecord(pvd[156:190])
	if err != nil {
		return nil, fmt.Errorf("root record in descriptor: %w", err)
	}
	if len(root.ident) != 1 || root.ident[0] != 0 || root.flags&2 == 0 {
		return nil, errors.New("root record in descriptor is not a directory named 0x00")
	}
	if err := checkPathTables(img, pvd, root.extent); err != nil {
		return nil, err
	}

	dirEnd := uint64(root.extent)*sectorSize + uint64(root.size)
	if root.size%sectorSize != 0 || root.size == 0 || dirEnd > uint64(len(img)) {
		return nil, fmt.Errorf("root directory extent %d size %d is outside the image", root.extent, root.size)
	}
	dir := img[root.extent*sectorSize : dirEnd]
	used := []span{{0, root.extent + root.size/sectorSize}} // metadata
	level1Name := regexp.MustCompile(`^[A-Z0-9_]{1,8}\.[A-Z0-9_]{0,3};1$`)
	var prevKey string
	for off, i := 0, 0; off < len(dir); i++ {
		if dir[off] == 0 {
			// No more records in this sector.
			off = (off/sectorSize + 1) * sectorSize
			i--
			continue
		}
		n := int(dir[off])
		if off%sectorSize+n > sectorSize {
			return nil, fmt.Errorf("record at offset %d crosses a sector boundary", off)
		}
		r, err := parseRecord(dir[off : off+n])
		if err != nil {
			return nil, fmt.Errorf("record at offset %d: %w", off, err)
		}
		off += n
		su, err := r.systemUse(img)
		if err != nil {
			return nil, fmt.Errorf("record at offset %d: %w", off-n, err)
		}
		switch i {
		case 0:
			if len(r.ident) != 1 || r.ident[0] != 0 || r.extent != root.extent || r.size != root.size {
				return nil, errors.New("first record is not '.' of the root")
			}
			if !su.sp {
				return nil, errors.New("no SUSP SP entry first in the root's '.' record")
			}
			if su.erID == "" {
				return nil, errors.New("no ER entry for Rock Ridge")
			}
			v.RockRidgeID = su.erID
			continue
		case 1:
			if len(r.ident) != 1 || r.ident[0] != 1 || r.extent != root.extent {
				return nil, errors.New("second record is not '..' of the root")
			}
			continue
		}
		if r.flags != 0 {
			return nil, fmt.Errorf("record %q has flags %#x, want a plain file", r.ident, r.flags)
		}
		iso := string(r.ident)
		if !level1Name.MatchString(iso) {
			return nil, fmt.Errorf("identifier %q is not a level 1 name", iso)
		}
		base, ext, _ := strings.Cut(strings.TrimSuffix(iso, ";1"), ".")
		key := fmt.Sprintf("%-8s%-3s", base, ext)
		if key <= prevKey {
			return nil, fmt.Errorf("identifier %q is out of order or repeated", iso)
		}
		prevKey = key
		if su.name == "" || su.mode == 0 {
			return nil, fmt.Errorf("record %q lacks Rock Ridge NM or PX", iso)
		}
		if _, dup := v.ByName(su.name); dup {
			return nil, fmt.Errorf("Rock Ridge name %q repeated", su.name)
		}
		end := uint64(r.extent)*sectorSize + uint64(r.size)
		if end > uint64(len(img)) {
			return nil, fmt.Errorf("file %q extent is outside the image", su.name)
		}
		if r.size > 0 {
			s := span{r.extent, r.extent + (r.size+sectorSize-1)/sectorSize}
			for _, u := range used {
				if s.start < u.end && u.start < s.end {
					return nil, fmt.Errorf("file %q overlaps other data", su.name)
				}
			}
			used = append(used, s)
		}
		v.Files = append(v.Files, File{
			Name:    su.name,
			ISOName: iso,
			Mode:    su.mode,
			ModTime: r.date,
			Extent:  r.extent,
			Data:    bytes.Clone(img[uint64(r.extent)*sectorSize : end]),
		})
	}
	return v, nil
}

type span struct{ start, end uint32 }

func checkPathTables(img, pvd []byte, rootExtent uint32) error {
	size, err := both32(pvd[132:])
	if err != nil {
		return fmt.Errorf("path table size: %w", err)
	}
	if size != 10 {
		return fmt.Errorf("path table size %d, want 10 for a lone root", size)
	}
	for _, t := range []struct {
		name  string
		loc   uint32
		order binary.ByteOrder
	}{
		{"L", binary.LittleEndian.Uint32(pvd[140:]), binary.LittleEndian},
		{"M", binary.BigEndian.Uint32(pvd[148:]), binary.BigEndian},
	} {
		if (uint64(t.loc)+1)*sectorSize > uint64(len(img)) {
			return fmt.Errorf("%s path table outside the image", t.name)
		}
		p := img[uint64(t.loc)*sectorSize:]
		if p[0] != 1 || t.order.Uint32(p[2:]) != rootExtent || t.order.Uint16(p[6:]) != 1 || p[8] != 0 {
			return fmt.Errorf("%s path table does not describe the root at %d", t.name, rootExtent)
		}
	}
	return nil
}

type record struct {
	extent, size uint32
	date         time.Time
	flags        byte
	ident        []byte
	su           []byte
}

func parseRecord(b []byte) (record, error) {
	if len(b) < 34 || int(b[0]) != len(b) || len(b)%2 != 0 {
		return record{}, fmt.Errorf("bad record length %d", b[0])
	}
	var r record
	var err error
	if r.extent, err = both32(b[2:]); err != nil {
		return r, fmt.Errorf("extent: %w", err)
	}
	if r.size, err = both32(b[10:]); err != nil {
		return r, fmt.Errorf("data length: %w", err)
	}
	if seq, err := both16(b[28:]); err != nil || seq != 1 {
		return r, fmt.Errorf("volume sequence number %d, %v", seq, err)
	}
	r.date = recordDate(b[18:25])
	r.flags = b[25]
	n := int(b[32])
	if n == 0 || 33+n > len(b) {
		return r, fmt.Errorf("identifier length %d", n)
	}
	r.ident = b[33 : 33+n]
	suOff := 33 + n
	if suOff%2 == 1 {
		if b[suOff] != 0 {
			return r, errors.New("padding byte after identifier is not zero")
		}
		suOff++
	}
	r.su = b[suOff:]
	return r, nil
}

// susp is what a record's system use area said.
type susp struct {
	sp   bool
	erID string
	name string
	mode uint32
}

// systemUse parses the SUSP entries, following one CE continuation.
func (r record) systemUse(img []byte) (susp, error) {
	var s susp
	area := r.su
	for hops := 0; ; hops++ {
		ce, err := s.parse(area, hops == 0)
		if err != nil {
			return s, err
		}
		if ce == nil {
			return s, nil
		}
		if hops == 1 {
			return s, errors.New("more than one continuation area")
		}
		start := uint64(ce[0])*sectorSize + uint64(ce[1])
		if uint64(ce[1])+uint64(ce[2]) > sectorSize || start+uint64(ce[2]) > uint64(len(img)) {
			return s, errors.New("CE entry points outside its sector or the image")
		}
		area = img[start : start+uint64(ce[2])]
	}
}

func (s *susp) parse(b []byte, first bool) (ce []uint32, err error) {
	for i := 0; len(b) >= 4; i++ {
		sig, n := string(b[:2]), int(b[2])
		if n < 4 || n > len(b) {
			return nil, fmt.Errorf("SUSP entry %q length %d", sig, n)
		}
		if b[3] != 1 {
			return nil, fmt.Errorf("SUSP entry %q version %d", sig, b[3])
		}
		e := b[:n]
		b = b[n:]
		switch sig {
		case "SP":
			if !first || i != 0 || n != 7 || e[4] != 0xbe || e[5] != 0xef || e[6] != 0 {
				return nil, errors.New("bad SP entry")
			}
			s.sp = true
		case "CE":
			if n != 28 {
				return nil, errors.New("bad CE entry")
			}
			ce = make([]uint32, 3)
			for j := range ce {
				if ce[j], err = both32(e[4+8*j:]); err != nil {
					return nil, fmt.Errorf("CE entry: %w", err)
				}
			}
		case "ER":
			if n < 8 || 8+int(e[4])+int(e[5])+int(e[6]) != n {
				return nil, errors.New("bad ER entry")
			}
			s.erID = string(e[8 : 8+int(e[4])])
		case "NM":
			if n < 5 || e[4] != 0 {
				return nil, errors.New("NM entry with flags or continuation")
			}
			if s.name != "" {
				return nil, errors.New("more than one NM entry")
			}
			s.name = string(e[5:])
		case "PX":
			if n != 36 && n != 44 {
				return nil, errors.New("bad PX entry")
			}
			if s.mode, err = both32(e[4:]); err != nil {
				return nil, fmt.Errorf("PX mode: %w", err)
			}
		}
	}
	for _, c := range b {
		if c != 0 {
			return nil, errors.New("trailing bytes after SUSP entries")
		}
	}
	return ce, nil
}

func recordDate(b []byte) time.Time {
	if bytes.Equal(b, make([]byte, 7)) {
		return time.Time{}
	}
	loc := time.FixedZone("", int(int8(b[6]))*15*60)
	return time.Date(1900+int(b[0]), time.Month(b[1]), int(b[2]), int(b[3]), int(b[4]), int(b[5]), 0, loc)
}

func volumeDate(b []byte) (time.Time, error) {
	if string(b[:16]) == "0000000000000000" && b[16] == 0 {
		return time.Time{}, nil
	}
	t, err := time.Parse("20060102150405", string(b[:14]))
	if err != nil {
		return time.Time{}, err
	}
	var hundredths int
	if _, err := fmt.Sscanf(string(b[14:16]), "%02d", &hundredths); err != nil {
		return time.Time{}, err
	}
	loc := time.FixedZone("", int(int8(b[16]))*15*60)
	return time.Date(t.Year(), t.Month(), t.Day(), t.Hour(), t.Minute(), t.Second(), hundredths*1e7, loc), nil
}

func both16(b []byte) (uint16, error) {
	le, be := binary.LittleEndian.Uint16(b), binary.BigEndian.Uint16(b[2:])
	if le != be {
		return 0, fmt.Errorf("both-endian copies differ: %d and %d", le, be)
	}
	return le, nil
}

func both32(b []byte) (uint32, error) {
	le, be := binary.LittleEndian.Uint32(b), binary.BigEndian.Uint32(b[4:])
	if le != be {
		return 0, fmt.Errorf("both-endian copies differ: %d and %d", le, be)
	}
	return le, nil
}
