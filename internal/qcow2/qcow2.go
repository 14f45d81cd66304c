// Package qcow2 reads the metadata of a qcow2 disk image and reports how
// the space inside it is divided between the active image and its internal
// snapshots.
//
// The package only reads: the image is opened read-only with os.Open and is
// never locked, so it can be inspected while a QEMU process has it open.
// Numbers taken from an image that is being written are a best-effort view:
// QEMU caches L2 tables in memory and writes them back lazily, so the on-disk
// tables may lag behind what the guest has written (for example, right after
// savevm the active table on disk can still reference the VM state clusters
// until QEMU flushes the image). Any flush — including the one QEMU does when
// it creates or deletes an internal snapshot — brings the file up to date.
// Torn reads of a table being rewritten can at worst yield a transient
// ErrCorrupt or slightly wrong numbers; retrying is safe.
//
// Accounting model. Every host data cluster reachable from an L1/L2 table
// (the active one or a snapshot's) is attributed to the tables that reach
// it:
//
//   - standard clusters count ClusterSize bytes, including clusters that
//     carry the "reads as zeros" flag but keep a preallocated host offset
//     (they still occupy space and are freed only when unreferenced);
//     zero clusters without a host offset count nothing;
//   - a compressed cluster counts the bytes of its compressed stream: from
//     its host offset to the end of the last 512-byte sector it uses (as the
//     descriptor encodes), clipped at the start of the next compressed
//     stream in the file and at the end of the file, so bytes of a sector
//     shared by two streams are not counted twice;
//   - metadata (header, L1/L2 tables, refcount structures, snapshot table)
//     is not counted anywhere.
//
// VM state saved by savevm / snapshot-save is stored, as the qcow2 spec
// describes, "like guest disk content" through the snapshot's own L1 table at
// guest offsets past the virtual disk size. Those clusters are therefore part
// of that snapshot's ReferencedBytes and (being referenced by nothing else)
// its ExclusiveBytes; VMStateSize is the size recorded in the snapshot table.
package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"sort"
	"time"
)

// Errors returned (wrapped) by Inspect. Test with errors.Is.
var (
	// ErrNotQcow2 reports a file that does not start with the qcow2 magic.
	ErrNotQcow2 = errors.New("not a qcow2 image")
	// ErrUnsupported reports a qcow2 image using a version or feature this
	// package does not handle (version 1, unknown versions, external data
	// files, unknown incompatible feature bits, unknown encryption methods,
	// cluster sizes above 2 MiB).
	ErrUnsupported = errors.New("unsupported qcow2 image")
	// ErrCorrupt reports inconsistent or truncated metadata, or metadata
	// too large to be plausible for the size of the file.
	ErrCorrupt = errors.New("corrupt qcow2 image")
)

// Usage describes space use inside one qcow2 image.
type Usage struct {
	ClusterSize int64
	FileSize    int64           // size of the file on the host
	ActiveBytes int64           // data clusters referenced by the active L1 table
	Snapshots   []SnapshotUsage // in the order of the snapshot table
}

// SnapshotUsage describes one internal snapshot.
type SnapshotUsage struct {
	ID, Name        string
	VMStateSize     int64 // bytes of VM state stored inside the image for this snapshot (0 for disk-only snapshots)
	DiskSize        int64 // virtual disk size at the snapshot
	ReferencedBytes int64 // data clusters its L1/L2 tables reference
	ExclusiveBytes  int64 // data clusters referenced by this snapshot only (not by another snapshot, not by the active image)
	Date            time.Time
}

// TotalExclusiveBytes is the sum of ExclusiveBytes over all snapshots: the
// space that deleting every snapshot would free (metadata aside).
func (u *Usage) TotalExclusiveBytes() int64 {
	var n int64
	for _, s := range u.Snapshots {
		n += s.ExclusiveBytes
	}
	return n
}

const (
	magic = "QFI\xfb"

	v2HeaderLen = 72
	v3HeaderLen = 104

	incompatDirty       = 1 << 0
	incompatCorrupt     = 1 << 1
	incompatDataFile    = 1 << 2
	incompatCompression = 1 << 3
	incompatExtL2       = 1 << 4
	incompatKnown       = incompatDirty | incompatCorrupt | incompatDataFile | incompatCompression | incompatExtL2

	offsetMask     = 0x00fffffffffffe00 // bits 9-55 of L1 and standard L2 entries
	flagCompressed = 1 << 62

	minClusterBits = 9
	maxClusterBits = 21 // QEMU's implementation limit (2 MiB)

	maxL1Entries      = 32 << 20 / 8 // QCOW_MAX_L1_SIZE
	maxSnapshots      = 65536        // QCOW_MAX_SNAPSHOTS
	maxSnapshotTable  = 64 << 20     // QCOW_MAX_SNAPSHOTS_SIZE
	maxSnapshotExtra  = 1024         // QCOW_MAX_SNAPSHOT_EXTRA_DATA
	snapshotEntryBase = 40

	// keyCompressed marks map keys of compressed clusters (host offsets are
	// below 2^56, so bit 63 is free).
	keyCompressed = 1 << 63
)

// scanBudget caps the number of L2 entries examined in one Inspect call
// (a bound on CPU time for hostile images; ~8.6e9 entries is far beyond
// 100 snapshots of a fully allocated 1 TiB disk).
var scanBudget int64 = 1 << 33

// Inspect reads the qcow2 image at path and reports its space use.
func Inspect(path string) (*Usage, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("qcow2: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("qcow2: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("qcow2: %s: not a regular file: %w", path, ErrNotQcow2)
	}
	return inspectFile(f, path, fi.Size())
}

// image is what Inspect reads: an *os.File (fuzz tests give it bytes in
// memory, so that the fuzzer exercises the parser, not the file system).
type image interface {
	io.ReaderAt
	Stat() (fs.FileInfo, error)
}

func inspectFile(f image, path string, size int64) (*Usage, error) {
	r := &reader{f: f, path: path, size: size}
	u, err := inspect(r)
	if err != nil {
		return nil, err
	}
	return u, nil
}

// reader reads bounded ranges of the image file.
type reader struct {
	f    image
	path string
	size int64 // current notion of the file size; refreshed when exceeded
}

func (r *reader) errorf(base error, format string, args ...any) error {
	return fmt.Errorf("qcow2: %s: %s: %w", r.path, fmt.Sprintf(format, args...), base)
}

// within reports whether [off, off+n) lies inside the file. The file may be
// growing (a running QEMU appends clusters), so the size is re-read once
// before giving up.
func (r *reader) within(off, n uint64) bool {
	end := off + n
	if end < off || end > math.MaxInt64 {
		return false
	}
	if int64(end) <= r.size {
		return true
	}
	fi, err := r.f.Stat()
	if err != nil {
		return false
	}
	r.size = fi.Size()
	return int64(end) <= r.size
}

func (r *reader) readAt(buf []byte, off uint64, what string) error {
	if !r.within(off, uint64(len(buf))) {
		return r.errorf(ErrCorrupt, "%s at offset %d (%d bytes) lies beyond the end of the file", what, off, len(buf))
	}
	n, err := r.f.ReadAt(buf, int64(off))
	if n == len(buf) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return r.errorf(ErrCorrupt, "%s at offset %d: file truncated", what, off)
	}
	return fmt.Errorf("qcow2: %s: reading %s: %w", r.path, what, err)
}

type header struct {
	version       uint32
	clusterBits   uint32
	size          uint64
	cryptMethod   uint32
	l1Size        uint32
	l1Offset      uint64
	nbSnapshots   uint32
	snapshotsOff  uint64
	incompatibles uint64
}

func parseHeader(r *reader) (*header, error) {
	var buf [v3HeaderLen]byte
	if r.size < int64(len(magic)) {
		return nil, r.errorf(ErrNotQcow2, "file too short")
	}
	if err := r.readAt(buf[:len(magic)], 0, "magic"); err != nil {
		return nil, err
	}
	if string(buf[:len(magic)]) != magic {
		return nil, r.errorf(ErrNotQcow2, "bad magic %q", buf[:len(magic)])
	}
	if err := r.readAt(buf[:8], 0, "header"); err != nil {
		return nil, err
	}
	be := binary.BigEndian
	h := &header{version: be.Uint32(buf[4:])}
	switch h.version {
	case 2, 3:
	default:
		return nil, r.errorf(ErrUnsupported, "version %d", h.version)
	}
	hlen := v2HeaderLen
	if h.version == 3 {
		hlen = v3HeaderLen
	}
	if err := r.readAt(buf[:hlen], 0, "header"); err != nil {
		return nil, err
	}
	h.clusterBits = be.Uint32(buf[20:])
	h.size = be.Uint64(buf[24:])
	h.cryptMethod = be.Uint32(buf[32:])
	h.l1Size = be.Uint32(buf[36:])
	h.l1Offset = be.Uint64(buf[40:])
	h.nbSnapshots = be.Uint32(buf[60:])
	h.snapshotsOff = be.Uint64(buf[64:])
	if h.version == 3 {
		h.incompatibles = be.Uint64(buf[72:])
		if l := be.Uint32(buf[100:]); l < v3HeaderLen {
			return nil, r.errorf(ErrCorrupt, "header length %d is below %d", l, v3HeaderLen)
		}
	}
	if h.clusterBits < minClusterBits {
		return nil, r.errorf(ErrCorrupt, "cluster_bits %d is below %d", h.clusterBits, minClusterBits)
	}
	if h.clusterBits > maxClusterBits {
		return nil, r.errorf(ErrUnsupported, "cluster size 2^%d exceeds 2 MiB", h.clusterBits)
	}
	if unknown := h.incompatibles &^ incompatKnown; unknown != 0 {
		return nil, r.errorf(ErrUnsupported, "unknown incompatible features %#x", unknown)
	}
	if h.incompatibles&incompatDataFile != 0 {
		return nil, r.errorf(ErrUnsupported, "external data file")
	}
	if h.incompatibles&incompatExtL2 != 0 && h.clusterBits < 14 {
		return nil, r.errorf(ErrCorrupt, "extended L2 entries with cluster_bits %d (minimum 14)", h.clusterBits)
	}
	// Encryption (AES or LUKS) only applies to guest data; L1/L2 tables
	// and the snapshot table are plain, so the accounting is unaffected.
	if h.cryptMethod > 2 {
		return nil, r.errorf(ErrUnsupported, "encryption method %d", h.cryptMethod)
	}
	if h.size > math.MaxInt64 {
		return nil, r.errorf(ErrCorrupt, "virtual size %d too large", h.size)
	}
	return h, nil
}

type snapshot struct {
	l1Offset uint64
	l1Size   uint32
	usage    SnapshotUsage
}

func align8(n uint64) uint64 { return (n + 7) &^ 7 }

func parseSnapshots(r *reader, h *header) ([]snapshot, error) {
	if h.nbSnapshots == 0 {
		return nil, nil
	}
	if h.nbSnapshots > maxSnapshots {
		return nil, r.errorf(ErrCorrupt, "%d snapshots (limit %d)", h.nbSnapshots, maxSnapshots)
	}
	if h.snapshotsOff&(uint64(1)<<h.clusterBits-1) != 0 {
		return nil, r.errorf(ErrCorrupt, "snapshot table offset %d is not cluster aligned", h.snapshotsOff)
	}
	// Every entry needs at least snapshotEntryBase bytes in the file.
	if !r.within(h.snapshotsOff, uint64(h.nbSnapshots)*snapshotEntryBase) {
		return nil, r.errorf(ErrCorrupt, "snapshot table of %d entries at offset %d does not fit in the file", h.nbSnapshots, h.snapshotsOff)
	}
	be := binary.BigEndian
	snaps := make([]snapshot, 0, h.nbSnapshots)
	pos := h.snapshotsOff
	var fixed [snapshotEntryBase]byte
	for i := uint32(0); i < h.nbSnapshots; i++ {
		if pos-h.snapshotsOff > maxSnapshotTable {
			return nil, r.errorf(ErrCorrupt, "snapshot table exceeds %d bytes", maxSnapshotTable)
		}
		what := fmt.Sprintf("snapshot table entry %d", i)
		if err := r.readAt(fixed[:], pos, what); err != nil {
			return nil, err
		}
		var s snapshot
		s.l1Offset = be.Uint64(fixed[0:])
		s.l1Size = be.Uint32(fixed[8:])
		idLen := uint64(be.Uint16(fixed[12:]))
		nameLen := uint64(be.Uint16(fixed[14:]))
		sec := be.Uint32(fixed[16:])
		nsec := be.Uint32(fixed[20:])
		vmState := uint64(be.Uint32(fixed[32:]))
		extraLen := uint64(be.Uint32(fixed[36:]))
		if extraLen > maxSnapshotExtra {
			return nil, r.errorf(ErrCorrupt, "%s: extra data size %d (limit %d)", what, extraLen, maxSnapshotExtra)
		}
		varLen := extraLen + idLen + nameLen
		rest := make([]byte, varLen)
		if err := r.readAt(rest, pos+snapshotEntryBase, what); err != nil {
			return nil, err
		}
		extra := rest[:extraLen]
		diskSize := h.size
		if len(extra) >= 8 {
			vmState = be.Uint64(extra[0:])
		}
		if len(extra) >= 16 {
			diskSize = be.Uint64(extra[8:])
		}
		if vmState > math.MaxInt64 || diskSize > math.MaxInt64 {
			return nil, r.errorf(ErrCorrupt, "%s: size field out of range", what)
		}
		s.usage = SnapshotUsage{
			ID:          string(rest[extraLen : extraLen+idLen]),
			Name:        string(rest[extraLen+idLen:]),
			VMStateSize: int64(vmState),
			DiskSize:    int64(diskSize),
			Date:        time.Unix(int64(sec), int64(nsec)),
		}
		snaps = append(snaps, s)
		pos += align8(snapshotEntryBase + varLen)
	}
	return snaps, nil
}

// Packing of the per-host-cluster owner word: bits 0-30 hold the first
// referrer + 1, bits 31-61 the last referrer + 1 (to count a cluster once
// per table), bit 62 is set once a second table references the cluster.
const (
	ownerMask      = 1<<31 - 1
	ownerLastShift = 31
	ownerShared    = 1 << 62
)

// keyState tracks which tables reference one compressed stream.
type keyState struct {
	first  int32 // first referrer (0 = active, i+1 = snapshot i)
	last   int32 // last referrer that counted it (dedups within a table)
	last2  int32 // same, for the second (compressed-only) pass
	shared bool  // referenced by more than one referrer
	size   uint64
}

type scanner struct {
	r           *reader
	clusterBits uint
	clusterSize uint64
	entrySize   int // 8, or 16 with extended L2 entries
	csizeShift  uint
	csizeMask   uint64
	coffMask    uint64
	budget      int64
	l2buf       []byte
}

// walk calls visit for every host data unit reachable from the L1 table at
// l1Off with l1Size entries. Each L2 table is visited at most once per call.
// For compressed clusters the key has keyCompressed set and end is the end
// of the last sector the stream uses; for standard clusters end is 0.
func (s *scanner) walk(l1Off uint64, l1Size uint32, what string, visit func(key, end uint64)) error {
	r := s.r
	if l1Size == 0 {
		return nil
	}
	l1 := make([]byte, uint64(l1Size)*8)
	if err := r.readAt(l1, l1Off, what+" L1 table"); err != nil {
		return err
	}
	seenL2 := make(map[uint64]struct{})
	be := binary.BigEndian
	for i := 0; i < len(l1); i += 8 {
		l2Off := be.Uint64(l1[i:]) & offsetMask
		if l2Off == 0 {
			continue
		}
		if l2Off&(s.clusterSize-1) != 0 {
			return r.errorf(ErrCorrupt, "%s L1 entry %d: L2 table offset %#x is not cluster aligned", what, i/8, l2Off)
		}
		if _, dup := seenL2[l2Off]; dup {
			continue
		}
		seenL2[l2Off] = struct{}{}
		s.budget -= int64(len(s.l2buf) / s.entrySize)
		if s.budget < 0 {
			return r.errorf(ErrCorrupt, "too much L2 metadata to scan")
		}
		if err := r.readAt(s.l2buf, l2Off, what+" L2 table"); err != nil {
			return err
		}
		for j := 0; j < len(s.l2buf); j += s.entrySize {
			e := be.Uint64(s.l2buf[j:])
			if e&flagCompressed != 0 {
				off := e & s.coffMask
				nsect := (e >> s.csizeShift) & s.csizeMask
				if off == 0 || !r.within(off, 1) {
					return r.errorf(ErrCorrupt, "%s: compressed cluster at %#x lies beyond the end of the file", what, off)
				}
				visit(off|keyCompressed, off&^511+(nsect+1)*512)
				continue
			}
			off := e & offsetMask
			if off == 0 {
				continue // unallocated, or zero cluster without preallocation
			}
			if off&(s.clusterSize-1) != 0 {
				return r.errorf(ErrCorrupt, "%s: data cluster offset %#x is not cluster aligned", what, off)
			}
			if !r.within(off, 1) {
				return r.errorf(ErrCorrupt, "%s: data cluster at %#x lies beyond the end of the file", what, off)
			}
			visit(off, 0)
		}
	}
	return nil
}

func inspect(r *reader) (*Usage, error) {
	h, err := parseHeader(r)
	if err != nil {
		return nil, err
	}
	fileSize := r.size
	snaps, err := parseSnapshots(r, h)
	if err != nil {
		return nil, err
	}

	cb := uint(h.clusterBits)
	cs := uint64(1) << cb
	sc := &scanner{
		r:           r,
		clusterBits: cb,
		clusterSize: cs,
		entrySize:   8,
		csizeShift:  62 - (cb - 8),
		csizeMask:   uint64(1)<<(cb-8) - 1,
		budget:      scanBudget,
		l2buf:       make([]byte, cs),
	}
	sc.coffMask = uint64(1)<<sc.csizeShift - 1
	if h.incompatibles&incompatExtL2 != 0 {
		sc.entrySize = 16
	}

	// Referrer 0 is the active table, referrer i+1 is snapshot i.
	type table struct {
		off  uint64
		size uint32
		what string
	}
	tables := []table{{h.l1Offset, h.l1Size, "active"}}
	for _, s := range snaps {
		tables = append(tables, table{s.l1Offset, s.l1Size, fmt.Sprintf("snapshot %q", s.usage.ID)})
	}
	// Each L1 table occupies its own clusters, so together they cannot be
	// larger than the file; this caps the work for hostile headers.
	var l1Total uint64
	for _, t := range tables {
		if t.size > maxL1Entries {
			return nil, r.errorf(ErrCorrupt, "%s L1 table has %d entries (limit %d)", t.what, t.size, maxL1Entries)
		}
		if t.size > 0 && t.off&(cs-1) != 0 {
			return nil, r.errorf(ErrCorrupt, "%s L1 table offset %#x is not cluster aligned", t.what, t.off)
		}
		l1Total += uint64(t.size) * 8
	}
	if !r.within(0, l1Total) {
		return nil, r.errorf(ErrCorrupt, "L1 tables total %d bytes, more than the file holds", l1Total)
	}

	// Standard clusters: one packed word per host cluster of the file
	// (8 bytes per cluster, e.g. 128 MiB for a 1 TiB image of 64 KiB
	// clusters). Compressed streams: a map keyed by their host offset.
	owners := make([]uint64, uint64(r.size)>>cb+1)
	ckeys := make(map[uint64]keyState)
	maxCKeys := r.size/2 + 1              // streams do not overlap and take >= 2 bytes
	refStd := make([]uint64, len(tables)) // standard clusters per referrer
	var walkErr error
	for i, t := range tables {
		ref := uint64(i) + 1 // stored +1 so that 0 means "unreferenced"
		err := sc.walk(t.off, t.size, t.what, func(key, end uint64) {
			if key&keyCompressed == 0 {
				idx := key >> cb
				for idx >= uint64(len(owners)) { // the file grew (live image)
					owners = append(owners, make([]uint64, idx+1-uint64(len(owners)))...)
				}
				v := owners[idx]
				switch {
				case v == 0:
					owners[idx] = ref | ref<<ownerLastShift
				case (v>>ownerLastShift)&ownerMask != ref:
					owners[idx] = v&^(ownerMask<<ownerLastShift) | ref<<ownerLastShift | ownerShared
				default:
					return // already counted for this table
				}
				refStd[i]++
				return
			}
			st, ok := ckeys[key]
			switch {
			case !ok:
				if int64(len(ckeys)) >= maxCKeys {
					walkErr = r.errorf(ErrCorrupt, "more compressed clusters than the file can hold")
					return
				}
				ckeys[key] = keyState{first: int32(i), last: int32(i), last2: -1, size: end}
			case st.last != int32(i):
				st.last = int32(i)
				st.shared = true
				ckeys[key] = st
			}
		})
		if err == nil {
			err = walkErr
		}
		if err != nil {
			return nil, err
		}
	}

	refBytes := make([]uint64, len(tables))
	excl := make([]uint64, len(tables))
	for i := range tables {
		refBytes[i] = refStd[i] * cs
	}
	for _, v := range owners {
		if v != 0 && v&ownerShared == 0 {
			excl[v&ownerMask-1] += cs
		}
	}
	if len(ckeys) > 0 {
		// Size each compressed stream: up to the end of its last sector,
		// but not into the next stream nor past the end of the file.
		starts := make([]uint64, 0, len(ckeys))
		for k := range ckeys {
			starts = append(starts, k&^keyCompressed)
		}
		sort.Slice(starts, func(a, b int) bool { return starts[a] < starts[b] })
		for n, start := range starts {
			k := start | keyCompressed
			st := ckeys[k]
			end := st.size
			if n+1 < len(starts) && starts[n+1] < end {
				end = starts[n+1]
			}
			if end > uint64(r.size) {
				end = uint64(r.size)
			}
			st.size = 0
			if end > start {
				st.size = end - start
			}
			ckeys[k] = st
			if !st.shared {
				excl[st.first] += st.size
			}
		}
		// Second pass for the per-table referenced bytes of compressed
		// streams, now that their sizes are known.
		for i, t := range tables {
			ref := int32(i)
			err := sc.walk(t.off, t.size, t.what, func(key, _ uint64) {
				if key&keyCompressed == 0 {
					return
				}
				st, ok := ckeys[key]
				if !ok || st.last2 == ref {
					return // new since the first pass (live image) or already counted
				}
				st.last2 = ref
				ckeys[key] = st
				refBytes[i] += st.size
			})
			if err != nil {
				return nil, err
			}
		}
	}

	u := &Usage{
		ClusterSize: int64(cs),
		FileSize:    fileSize,
		ActiveBytes: clampInt64(refBytes[0]),
		Snapshots:   make([]SnapshotUsage, len(snaps)),
	}
	for i, s := range snaps {
		su := s.usage
		su.ReferencedBytes = clampInt64(refBytes[i+1])
		su.ExclusiveBytes = clampInt64(excl[i+1])
		u.Snapshots[i] = su
	}
	return u, nil
}

func clampInt64(v uint64) int64 {
	if v > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(v)
}

// SnapshotNames lists the names of the internal snapshots of the qcow2
// image at path, reading only its header and snapshot table.
func SnapshotNames(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("qcow2: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("qcow2: %w", err)
	}
	r := &reader{f: f, path: path, size: fi.Size()}
	h, err := parseHeader(r)
	if err != nil {
		return nil, err
	}
	snaps, err := parseSnapshots(r, h)
	if err != nil {
		return nil, err
	}
	names := make([]string, len(snaps))
	for i, s := range snaps {
		names[i] = s.usage.Name
	}
	return names, nil
}
