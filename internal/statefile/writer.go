package statefile

import (
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// writeBufSize is the Writer's buffer; large writes amortise syscalls.
	writeBufSize = 4 << 20
)

// Writer streams a payload into a new state file. Nothing appears under the
// final path until Commit succeeds; until then the data lives in a hidden
// temporary file in the same directory (".NAME.tmp*"), which Abort, or a
// failed Commit, removes.
//
// Write, ReadFrom, Commit and Abort must not be called concurrently with each
// other; Written may be called from any goroutine (for progress reporting).
// To cancel a ReadFrom that is blocked on its source, close the source (for
// example the QEMU socket), then call Abort.
//
// After any error from Write or ReadFrom (including an error from
// ReadFrom's source) the Writer is failed: later writes return the same
// error and Commit refuses, so an incomplete migration stream can never be
// committed as a valid state file.
type Writer struct {
	path string // final path
	tmp  string // temporary file
	f    *os.File

	hdr       Header
	dataStart int64

	buf         []byte // pending payload bytes; cap is the buffer size
	fileWritten int64  // payload bytes handed to the file
	hash        hash.Hash32
	written     atomic.Int64

	err       error // sticky failure
	committed bool
	aborted   bool
}

// Create starts writing a state file at path with header h. If h.CreatedAt is
// zero it is set to the current time. The file is created with mode 0600: it
// contains the guest's memory.
func Create(path string, h Header) (*Writer, error) {
	if h.VM == "" {
		return nil, fmt.Errorf("create state file %s: header has no vm name", path)
	}
	if h.Kind != KindSuspend && h.Kind != KindSnapshot && h.Kind != KindCheckpoint {
		return nil, fmt.Errorf("create state file %s: header kind %q is not %q, %q or %q", path, h.Kind, KindSuspend, KindSnapshot, KindCheckpoint)
	}
	if (h.Kind == KindCheckpoint) != (h.Checkpoint != nil) {
		return nil, fmt.Errorf("create state file %s: a checkpoint, and only a checkpoint, names its checkpoint", path)
	}
	if h.CreatedAt.IsZero() {
		h.CreatedAt = time.Now()
	}
	prefix, err := encodeHeader(h)
	if err != nil {
		return nil, fmt.Errorf("create state file %s: encode header: %w", path, err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return nil, ioErr("create", path, err)
	}
	if _, err := f.Write(prefix); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, ioErr("write", path, err)
	}
	return &Writer{
		path:      path,
		tmp:       f.Name(),
		f:         f,
		hdr:       h,
		dataStart: int64(len(prefix)),
		buf:       make([]byte, 0, writeBufSize),
		hash:      crc32.New(castagnoli),
	}, nil
}

// Path returns the final path the Writer commits to.
func (w *Writer) Path() string { return w.path }

// Written returns the number of payload bytes accepted so far. It is safe to
// call concurrently with Write and ReadFrom.
func (w *Writer) Written() int64 { return w.written.Load() }

func (w *Writer) usable() error {
	switch {
	case w.err != nil:
		return w.err
	case w.committed:
		return fmt.Errorf("state file %s: write after commit", w.path)
	case w.aborted:
		return fmt.Errorf("state file %s: write after abort", w.path)
	}
	return nil
}

// Write appends payload bytes.
func (w *Writer) Write(p []byte) (int, error) {
	if err := w.usable(); err != nil {
		return 0, err
	}
	n := 0
	for len(p) > 0 {
		if len(w.buf) == 0 && len(p) >= cap(w.buf) {
			// Large write with an empty buffer: skip the copy.
			if err := w.writeChunk(p); err != nil {
				return n, err
			}
			w.written.Add(int64(len(p)))
			return n + len(p), nil
		}
		c := copy(w.buf[len(w.buf):cap(w.buf)], p)
		w.buf = w.buf[:len(w.buf)+c]
		p = p[c:]
		n += c
		w.written.Add(int64(c))
		if len(w.buf) == cap(w.buf) {
			if err := w.flush(); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// ReadFrom copies the payload from r until io.EOF, reading straight into the
// Writer's buffer. It returns the number of bytes copied. An error from r
// fails the Writer (see Writer).
func (w *Writer) ReadFrom(r io.Reader) (int64, error) {
	if err := w.usable(); err != nil {
		return 0, err
	}
	var total int64
	empty := 0
	for {
		if len(w.buf) == cap(w.buf) {
			if err := w.flush(); err != nil {
				return total, err
			}
		}
		n, err := r.Read(w.buf[len(w.buf):cap(w.buf)])
		if n < 0 || n > cap(w.buf)-len(w.buf) {
			w.err = fmt.Errorf("write state file %s: payload source returned an invalid count %d", w.path, n)
			return total, w.err
		}
		w.buf = w.buf[:len(w.buf)+n]
		total += int64(n)
		w.written.Add(int64(n))
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			w.err = fmt.Errorf("write state file %s: reading the payload: %w", w.path, err)
			return total, w.err
		}
		if n == 0 {
			if empty++; empty >= 100 {
				w.err = fmt.Errorf("write state file %s: reading the payload: %w", w.path, io.ErrNoProgress)
				return total, w.err
			}
		} else {
			empty = 0
		}
	}
}

func (w *Writer) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	err := w.writeChunk(w.buf)
	w.buf = w.buf[:0]
	return err
}

// writeChunk checksums b and writes it to the file.
func (w *Writer) writeChunk(b []byte) error {
	w.hash.Write(b)
	off := w.dataStart + w.fileWritten
	if _, err := w.f.Write(b); err != nil {
		w.err = ioErr("write", w.path, err)
		return w.err
	}
	w.fileWritten += int64(len(b))
	// Start writeback of what was just written without waiting for it, so
	// the fsync in Commit finds little left to do: the disk works while
	// the stream is still coming in. Errors surface in Commit's fsync.
	unix.SyncFileRange(int(w.f.Fd()), off, int64(len(b)), unix.SYNC_FILE_RANGE_WRITE)
	return nil
}

// Commit writes the trailer (payload size and checksum), fsyncs the file,
// renames it to the final path (replacing any file there) and fsyncs the
// directory. If Commit fails, the temporary file is removed and nothing is
// left under the final path that was not there before.
func (w *Writer) Commit() (Info, error) {
	if w.committed {
		return Info{}, fmt.Errorf("commit state file %s: already committed", w.path)
	}
	if w.aborted {
		return Info{}, fmt.Errorf("commit state file %s: already aborted", w.path)
	}
	info, err := w.commit()
	if err != nil {
		w.Abort()
		return Info{}, err
	}
	w.committed = true
	return info, nil
}

func (w *Writer) commit() (Info, error) {
	if w.err != nil {
		return Info{}, fmt.Errorf("commit state file %s: an earlier write failed: %w", w.path, w.err)
	}
	if err := w.flush(); err != nil {
		return Info{}, err
	}
	size := w.written.Load()
	sum := w.hash.Sum32()
	if _, err := w.f.Write(encodeTrailer(size, sum)); err != nil {
		return Info{}, ioErr("write", w.path, err)
	}
	if err := w.f.Sync(); err != nil {
		return Info{}, ioErr("sync", w.path, err)
	}
	err := w.f.Close()
	w.f = nil
	if err != nil {
		return Info{}, ioErr("close", w.path, err)
	}
	if err := os.Rename(w.tmp, w.path); err != nil {
		return Info{}, fmt.Errorf("commit state file %s: rename temporary file: %w", w.path, unwrapPath(err))
	}
	// The rename is durable only once the directory entry is on disk. The
	// file itself is complete at this point, so a failure here is reported
	// but the file is left in place.
	if err := syncDir(filepath.Dir(w.path)); err != nil {
		w.committed = true // do not let Abort remove anything
		return Info{}, fmt.Errorf("commit state file %s: sync directory: %w", w.path, err)
	}
	return Info{
		Header:        w.hdr,
		PayloadSize:   size,
		Checksum:      formatSum(sum),
		Path:          w.path,
		FileSize:      w.dataStart + size + TrailerSize,
		PayloadOffset: w.dataStart,
	}, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

func unwrapPath(err error) error {
	var le *os.LinkError
	if errors.As(err, &le) {
		return le.Err
	}
	return err
}

// Abort abandons the file: it closes and removes the temporary file. It is
// idempotent, safe after a failed Write or Commit, and a no-op after a
// successful Commit.
func (w *Writer) Abort() error {
	if w.committed || w.aborted {
		return nil
	}
	w.aborted = true
	w.buf = nil
	if w.f != nil {
		w.f.Close()
		w.f = nil
	}
	if err := os.Remove(w.tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return ioErr("remove temporary file of", w.path, err)
	}
	return nil
}
