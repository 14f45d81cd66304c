// Package imagestore keeps OS images by content: each blob is a file named
// after its SHA-256, written once (to a temporary name, checked, renamed),
// never changed. Managers keep the images users import; hosts keep copies
// of the images their VMs use (in their storage pool, or a local cache).
package imagestore

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Formats of images.
const (
	FormatQcow2 = "qcow2"
	FormatRaw   = "raw"
	FormatISO   = "iso"
)

// Errors of an import, each with what to do in its message.
var (
	ErrNotImage = errors.New("not a disk image")
	ErrBacking  = errors.New("the image depends on another file")
	ErrCorrupt  = errors.New("the image is damaged")
	ErrTooLarge = errors.New("the image is too large")
	ErrDigest   = errors.New("the image's content does not match its digest")
)

// Info describes a blob.
type Info struct {
	Digest      string `json:"digest"` // sha256:HEX
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual_size"` // the disk's size as the guest sees it (the file's for an ISO)
	FileSize    int64  `json:"file_size"`
}

// Store is a directory of blobs.
type Store struct{ dir string }

// Open makes (if need be) and opens a store in dir.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("image store %s: %w", dir, err)
	}
	return &Store{dir: dir}, nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// ValidDigest tells whether d is sha256:<64 hex digits>.
func ValidDigest(d string) bool {
	h, ok := strings.CutPrefix(d, "sha256:")
	if !ok || len(h) != 64 {
		return false
	}
	_, err := hex.DecodeString(h)
	return err == nil && strings.ToLower(h) == h
}

// Path is where the blob of digest is (whether or not it is there).
func (s *Store) Path(digest string) string {
	return filepath.Join(s.dir, strings.Replace(digest, ":", "-", 1))
}

// Has tells whether the blob of digest is in the store.
func (s *Store) Has(digest string) bool {
	if !ValidDigest(digest) {
		return false
	}
	_, err := os.Stat(s.Path(digest))
	return err == nil
}

// Import streams r (at most max bytes) into the store, checks it is an
// image Vigil can run (see Inspect), and returns what it is. On any
// failure nothing stays behind.
func (s *Store) Import(ctx context.Context, r io.Reader, max int64) (Info, error) {
	tmp, digest, size, err := s.receive(r, max)
	if err != nil {
		return Info{}, err
	}
	defer os.Remove(tmp) // after a successful rename this is a no-op
	format, vsize, err := Inspect(ctx, tmp)
	if err != nil {
		return Info{}, err
	}
	if err := s.place(tmp, digest); err != nil {
		return Info{}, err
	}
	return Info{Digest: digest, Format: format, VirtualSize: vsize, FileSize: size}, nil
}

// Add places a blob fetched from another store, refusing content that
// does not hash to digest.
func (s *Store) Add(r io.Reader, digest string, max int64) error {
	if !ValidDigest(digest) {
		return fmt.Errorf("%w: %q is not a sha256 digest", ErrDigest, digest)
	}
	if s.Has(digest) {
		return nil
	}
	tmp, got, _, err := s.receive(r, max)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	if got != digest {
		return fmt.Errorf("%w: received %s, wanted %s", ErrDigest, got, digest)
	}
	return s.place(tmp, digest)
}

// LinkFrom places the blob of digest held by other, a store on the same
// file system, as a hard link: blobs are read-only and never change, so
// the two stores can share it (the dev agent's manager and host do). It
// fails, changing nothing, when the stores are on different file systems.
func (s *Store) LinkFrom(other *Store, digest string) error {
	if !ValidDigest(digest) {
		return fmt.Errorf("%w: %q is not a sha256 digest", ErrDigest, digest)
	}
	if s.Has(digest) {
		return nil
	}
	if err := os.Link(other.Path(digest), s.Path(digest)); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("link image: %w", err)
	}
	return nil
}

// receive writes r to a temporary file in the store, hashing it.
func (s *Store) receive(r io.Reader, max int64) (string, string, int64, error) {
	var suffix [8]byte
	rand.Read(suffix[:])
	tmp := filepath.Join(s.dir, ".incoming-"+hex.EncodeToString(suffix[:]))
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return "", "", 0, fmt.Errorf("store image: %w", err)
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(r, max+1))
	if err == nil && n > max {
		err = fmt.Errorf("%w: more than %d bytes", ErrTooLarge, max)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		if errors.Is(err, ErrTooLarge) {
			return "", "", 0, err
		}
		return "", "", 0, fmt.Errorf("store image: %w", err)
	}
	return tmp, "sha256:" + hex.EncodeToString(h.Sum(nil)), n, nil
}

// place renames a received blob into place (read-only: blobs never change).
func (s *Store) place(tmp, digest string) error {
	if err := os.Chmod(tmp, 0o444); err != nil {
		return fmt.Errorf("store image: %w", err)
	}
	if err := os.Rename(tmp, s.Path(digest)); err != nil {
		return fmt.Errorf("store image: %w", err)
	}
	if d, err := os.Open(s.dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// Remove deletes a blob (absent is fine).
func (s *Store) Remove(digest string) error {
	if !ValidDigest(digest) {
		return fmt.Errorf("%w: %q is not a sha256 digest", ErrDigest, digest)
	}
	if err := os.Remove(s.Path(digest)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// List is every blob's digest.
func (s *Store) List() ([]string, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if d := strings.Replace(e.Name(), "-", ":", 1); ValidDigest(d) {
			out = append(out, d)
		}
	}
	return out, nil
}

// Inspect says what the file at path is and its virtual size, refusing
// what Vigil cannot run safely: a file that is not a disk image or an ISO,
// an image that refers to another file (a backing file or an external data
// file: it could read any file of the host), a damaged or truncated image.
func Inspect(ctx context.Context, path string) (string, int64, error) {
	if iso, size, err := isISO(path); err != nil {
		return "", 0, err
	} else if iso {
		return FormatISO, size, nil
	}
	var info struct {
		Format          string `json:"format"`
		VirtualSize     int64  `json:"virtual-size"`
		BackingFilename string `json:"backing-filename"`
		FormatSpecific  struct {
			Data struct {
				DataFile string `json:"data-file"`
				Corrupt  bool   `json:"corrupt"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	out, err := qemuImg(ctx, "info", "--output=json", "-U", path)
	if err != nil {
		return "", 0, fmt.Errorf("%w: qemu-img cannot read it: %v", ErrNotImage, err)
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return "", 0, fmt.Errorf("%w: qemu-img info: %v", ErrNotImage, err)
	}
	switch {
	case info.BackingFilename != "":
		return "", 0, fmt.Errorf("%w: it has a backing file (%s): flatten it first with 'qemu-img convert -O qcow2 IN OUT'", ErrBacking, info.BackingFilename)
	case info.FormatSpecific.Data.DataFile != "":
		return "", 0, fmt.Errorf("%w: it keeps its data in an external file (%s): convert it first with 'qemu-img convert -O qcow2 IN OUT'", ErrBacking, info.FormatSpecific.Data.DataFile)
	case info.FormatSpecific.Data.Corrupt:
		return "", 0, fmt.Errorf("%w: qemu-img marks it corrupt", ErrCorrupt)
	}
	switch info.Format {
	case FormatQcow2:
		// A truncated or damaged qcow2 still has a readable header; its
		// refcounts and tables tell.
		var check struct {
			CheckErrors int `json:"check-errors"`
			Corruptions int `json:"corruptions"`
		}
		cout, cerr := qemuImg(ctx, "check", "--output=json", "-U", "-f", "qcow2", path)
		json.Unmarshal(cout, &check)
		if check.CheckErrors > 0 || check.Corruptions > 0 || (cerr != nil && len(cout) == 0) {
			return "", 0, fmt.Errorf("%w: qemu-img check finds %d corruptions and %d errors (a truncated or damaged file: copy it again)", ErrCorrupt, check.Corruptions, check.CheckErrors)
		}
	case FormatRaw:
		// Any file reads as "raw": a disk image has a partition table.
		ok, err := hasPartitionTable(path)
		if err != nil {
			return "", 0, err
		}
		if !ok {
			return "", 0, fmt.Errorf("%w: it is neither qcow2, an ISO, nor a raw disk with a partition table (MBR or GPT)", ErrNotImage)
		}
	default:
		return "", 0, fmt.Errorf("%w: format %s is not supported: convert it with 'qemu-img convert -O qcow2 IN OUT'", ErrNotImage, info.Format)
	}
	return info.Format, info.VirtualSize, nil
}

func qemuImg(ctx context.Context, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "qemu-img", args...)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%v: %s", err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// isISO looks for ISO 9660's "CD001" in the first volume descriptor.
func isISO(path string) (bool, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return false, 0, err
	}
	b := make([]byte, 5)
	if _, err := f.ReadAt(b, 16*2048+1); err != nil {
		return false, fi.Size(), nil
	}
	return string(b) == "CD001", fi.Size(), nil
}

// hasPartitionTable tells whether a raw disk has an MBR boot signature or a
// GPT header.
func hasPartitionTable(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	b := make([]byte, 1024)
	n, _ := io.ReadFull(f, b)
	if n < 512 {
		return false, nil
	}
	if n >= 520 && string(b[512:520]) == "EFI PART" {
		return true, nil
	}
	return b[510] == 0x55 && b[511] == 0xaa, nil
}
