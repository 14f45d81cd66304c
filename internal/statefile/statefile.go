// Package statefile reads and writes Vigil state files: a VM's full running
// state (the QEMU migration stream: RAM, device state, CPU state) wrapped in
// a small versioned envelope that records what the stream belongs to and lets
// Vigil detect a file that is not a state file, was written by a newer Vigil,
// was cut off, or was damaged.
//
// # File layout (format version 1)
//
// All integers are big-endian. CRC-32C is the Castagnoli CRC
// (hash/crc32.Castagnoli).
//
//	offset        size  field
//	0             10    magic "VIGILSTATE"
//	10            4     u32 format version (1)
//	14            4     u32 n = length of the header JSON (at most MaxHeaderSize)
//	18            n     header JSON (the Header struct)
//	18+n          4     u32 CRC-32C of bytes [0, 18+n) (magic, version, length, JSON)
//	22+n          pad   zero bytes up to P, the next multiple of 4096
//	P             S     payload (the QEMU migration stream); P = Info.PayloadOffset
//	P+S           8     trailer: u64 S = payload size
//	P+S+8         4     trailer: u32 CRC-32C of the payload
//	P+S+12        4     trailer: u32 CRC-32C of bytes [P+S, P+S+12)
//	P+S+16        8     trailer: end magic "VIGILEND"
//
// so the file is P + S + TrailerSize (24) bytes long.
//
// The trailer lets the Writer stream the payload without seeking back, and
// lets Open find the payload size and detect a cut-off file by reading only
// the two ends of the file: a complete file always ends with the end magic
// and its size matches P + S + 24. The payload starts on a 4096-byte
// boundary, so it can also be handed to QEMU directly (for example as
// "file:PATH,offset=P") or read with O_DIRECT.
//
// # Checksums
//
// The header, the payload and the trailer each carry a CRC-32C, so Open
// detects any damage to the header or trailer without reading the payload,
// and Verify detects damage to the payload.
//
// CRC-32C was chosen over SHA-256 by measurement (BenchmarkChecksum,
// BenchmarkWrite and BenchmarkPlainBufferedWrite; 2-vCPU AMD EPYC with
// SHA-NI, Go 1.26, 256 MiB payloads): SHA-256 hashes at 1.5–1.8 GB/s, and with
// it state file writes to tmpfs ran at 0.8–1.0 GB/s against 1.7–2.0 GB/s for a
// plain 4 MiB-buffered write: the checksum was the bottleneck. Hashing on a
// second goroutine, overlapped with write(2), did not help on that machine.
// CRC-32C runs at ~7 GB/s (SSE4.2 on amd64, CRC instructions on arm64), and
// with it state file writes run within ~5–10% of a plain buffered write (the
// rest is the rename and the directory fsync).
//
// The checksum guards against accidental damage (disk errors,
// bad copies, bugs), not tampering: a random corruption goes unnoticed with
// probability 2^-32, and the structural checks (magic, sizes, end marker)
// catch truncation independently of it. The file holds guest memory and is
// created with mode 0600; integrity against an attacker who can write it is
// out of scope.
//
// # Errors
//
// Problems with a file's content are reported as *FormatError, which names the
// file and what is wrong, and matches one of the sentinel errors with
// errors.Is:
//
//   - ErrNotStateFile: the file does not start with the magic (or is not a
//     regular file).
//   - ErrVersion: the magic is right but the format version is not one this
//     build reads.
//   - ErrTruncated: the file ends before its header or trailer says it should,
//     or the trailer is missing (a file that was cut off or never finished).
//     An empty file, and any file whose bytes are a proper prefix of the
//     magic, is reported as ErrTruncated, not ErrNotStateFile: those bytes are
//     exactly what a cut-off state file would look like.
//   - ErrCorrupt: a checksum does not match, sizes are inconsistent, or the
//     header JSON cannot be decoded.
//
// I/O errors (permission denied, file not found, disk errors) are returned
// wrapped with the path, so errors.Is(err, fs.ErrNotExist) and the like work.
package statefile

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"time"
)

const (
	// Magic is the first 10 bytes of every state file.
	Magic = "VIGILSTATE"
	// EndMagic is the last 8 bytes of every complete state file.
	EndMagic = "VIGILEND"
	// Version is the format version this package writes and reads.
	Version = 1

	// MaxHeaderSize bounds the header JSON, so a damaged length field cannot
	// make Open allocate gigabytes.
	MaxHeaderSize = 4 << 20
	// PayloadAlign is the alignment of the payload's start offset.
	PayloadAlign = 4096
	// TrailerSize is the size of the fixed trailer at the end of the file.
	TrailerSize = 24 // u64 size, u32 payload crc, u32 trailer crc, 8-byte end magic
	// ChecksumAlgorithm names the checksum in Info.Checksum.
	ChecksumAlgorithm = "crc32c"

	// KindSuspend marks the state of a VM that was suspended to disk.
	KindSuspend = "suspend"
	// KindSnapshot marks a live snapshot of a VM's running state.
	KindSnapshot = "snapshot"
	// KindCheckpoint marks a protected VM's checkpoint, kept by the host of
	// its standby (see Header.Checkpoint).
	KindCheckpoint = "checkpoint"

	fixedPrefixSize = 18 // 10-byte magic, u32 version, u32 header length
	headerSumSize   = 4
)

// Sentinel errors; match with errors.Is.
var (
	ErrNotStateFile = errors.New("not a vigil state file")
	ErrVersion      = errors.New("unsupported state file format version")
	ErrTruncated    = errors.New("state file is truncated")
	ErrCorrupt      = errors.New("state file is corrupt")
)

// Header is written at the start of the file, before the payload.
type Header struct {
	VM string `json:"vm"`
	// Hardware is the VM's hardware definition as JSON (memory, cpus,
	// devices, machine type); opaque to this package. The restored QEMU must
	// be started with the same hardware for the stream to load.
	Hardware    json.RawMessage `json:"hardware"`
	QEMUVersion string          `json:"qemu_version"`
	Kind        string          `json:"kind"` // KindSuspend, KindSnapshot or KindCheckpoint
	CreatedAt   time.Time       `json:"created_at"`
	// Checkpoint is set on a KindCheckpoint file.
	Checkpoint *Checkpoint `json:"checkpoint,omitempty"`
}

// Checkpoint says which checkpoint of a protected VM a file holds.
type Checkpoint struct {
	Seq uint64 `json:"seq"`
	// DiskSnapshot is the internal snapshot of the VM's disk taken at the
	// same instant as the memory.
	DiskSnapshot string `json:"disk_snapshot"`
	// Run identifies the QEMU process the checkpoint was taken from.
	Run        string `json:"run"`
	Generation int64  `json:"generation"`
}

// Info is what Open (or Commit) learns about a state file: the header plus
// the payload's size and checksum from the trailer.
type Info struct {
	Header
	PayloadSize int64
	// Checksum is the payload's CRC-32C as 8 lower-case hex digits
	// (see ChecksumAlgorithm).
	Checksum string
	Path     string
	FileSize int64
	// PayloadOffset is where the payload starts in the file (a multiple of
	// PayloadAlign).
	PayloadOffset int64
}

// FormatError reports a problem with a state file's content. Its Kind is one
// of ErrNotStateFile, ErrVersion, ErrTruncated or ErrCorrupt, and errors.Is
// matches it.
type FormatError struct {
	Path   string
	Kind   error
	Detail string
}

func (e *FormatError) Error() string {
	var what string
	switch e.Kind {
	case ErrNotStateFile:
		what = "is not a vigil state file"
	case ErrVersion:
		what = "has an unsupported format version"
	case ErrTruncated:
		what = "is truncated"
	case ErrCorrupt:
		what = "is corrupt"
	default:
		what = "is invalid"
	}
	return fmt.Sprintf("state file %s %s: %s", e.Path, what, e.Detail)
}

func (e *FormatError) Unwrap() error { return e.Kind }

func formatErr(path string, kind error, format string, args ...any) error {
	return &FormatError{Path: path, Kind: kind, Detail: fmt.Sprintf(format, args...)}
}

// ioErr wraps an I/O error with what was being done and the path, without
// repeating the path when err is an *fs.PathError.
func ioErr(op, path string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s state file %s: %s: %w", op, path, pe.Op, pe.Err)
	}
	return fmt.Errorf("%s state file %s: %w", op, path, err)
}

func alignUp(n int64) int64 {
	return (n + PayloadAlign - 1) / PayloadAlign * PayloadAlign
}

// encodeHeader returns the on-disk prefix for h: fixed fields, JSON, header
// checksum and zero padding up to the payload offset.
func encodeHeader(h Header) ([]byte, error) {
	js, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	if len(js) > MaxHeaderSize {
		return nil, fmt.Errorf("header is %d bytes, more than the limit of %d", len(js), MaxHeaderSize)
	}
	end := fixedPrefixSize + len(js)
	dataStart := alignUp(int64(end + headerSumSize))
	buf := make([]byte, dataStart)
	copy(buf, Magic)
	binary.BigEndian.PutUint32(buf[len(Magic):], Version)
	binary.BigEndian.PutUint32(buf[len(Magic)+4:], uint32(len(js)))
	copy(buf[fixedPrefixSize:], js)
	binary.BigEndian.PutUint32(buf[end:], crc32.Checksum(buf[:end], castagnoli))
	return buf, nil
}

func encodeTrailer(size int64, sum uint32) []byte {
	t := make([]byte, TrailerSize)
	binary.BigEndian.PutUint64(t, uint64(size))
	binary.BigEndian.PutUint32(t[8:], sum)
	binary.BigEndian.PutUint32(t[12:], crc32.Checksum(t[:12], castagnoli))
	copy(t[16:], EndMagic)
	return t
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func formatSum(sum uint32) string { return fmt.Sprintf("%08x", sum) }
