package statefile

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"sync"
)

const verifyBufSize = 4 << 20

// Reader gives access to a state file opened with Open.
//
// Info, Verify and reading a Payload are safe to use concurrently: they read
// with pread and do not share a file offset, except Payload's WriteTo fast
// path, which is serialised internally.
type Reader struct {
	f    file
	info Info
	mu   sync.Mutex // guards the file offset, used by payloadReader.WriteTo
}

// Open opens a state file and checks its header and trailer (magic, version,
// header checksum and JSON, end magic, sizes consistent with the file size)
// without reading the payload. Use Verify to check the payload checksum.
func Open(path string) (*Reader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, ioErr("open", path, err)
	}
	return open(f, path)
}

// file is what a Reader reads: an *os.File (fuzz tests give it bytes in
// memory, so that the fuzzer exercises the parser, not the file system).
type file interface {
	io.ReaderAt
	io.ReadSeeker
	io.Closer
	Stat() (fs.FileInfo, error)
}

func open(f file, path string) (*Reader, error) {
	info, err := readInfo(f, path)
	if err != nil {
		f.Close()
		return nil, err
	}
	return &Reader{f: f, info: info}, nil
}

func readInfo(f file, path string) (Info, error) {
	st, err := f.Stat()
	if err != nil {
		return Info{}, ioErr("stat", path, err)
	}
	if !st.Mode().IsRegular() {
		return Info{}, formatErr(path, ErrNotStateFile, "not a regular file (%s)", st.Mode().Type())
	}
	size := st.Size()

	// Fixed prefix: magic, version, header length.
	fixed := make([]byte, fixedPrefixSize)
	n, err := f.ReadAt(fixed, 0)
	if err != nil && err != io.EOF {
		return Info{}, ioErr("read", path, err)
	}
	got := fixed[:n]
	m := min(n, len(Magic))
	if !bytes.Equal(got[:m], []byte(Magic[:m])) {
		return Info{}, formatErr(path, ErrNotStateFile, "bad magic (file starts with %q, want %q)", got[:m], Magic)
	}
	if n == 0 {
		return Info{}, formatErr(path, ErrTruncated, "file is empty")
	}
	if n < fixedPrefixSize {
		return Info{}, formatErr(path, ErrTruncated, "file is only %d bytes, it ends inside the fixed header", n)
	}
	if v := binary.BigEndian.Uint32(got[len(Magic):]); v != Version {
		return Info{}, formatErr(path, ErrVersion, "format version %d, this build reads version %d", v, Version)
	}
	hlen := int64(binary.BigEndian.Uint32(got[len(Magic)+4:]))
	if hlen > MaxHeaderSize {
		return Info{}, formatErr(path, ErrCorrupt, "header length %d exceeds the limit of %d", hlen, MaxHeaderSize)
	}
	hdrEnd := int64(fixedPrefixSize) + hlen
	dataStart := alignUp(hdrEnd + headerSumSize)
	if size < dataStart {
		return Info{}, formatErr(path, ErrTruncated, "file is %d bytes but its header extends to byte %d", size, dataStart)
	}

	// Header JSON, header checksum, padding.
	prefix := make([]byte, dataStart)
	copy(prefix, got)
	if _, err := f.ReadAt(prefix[fixedPrefixSize:], fixedPrefixSize); err != nil {
		if err == io.EOF {
			return Info{}, formatErr(path, ErrTruncated, "file shrank while reading the header")
		}
		return Info{}, ioErr("read", path, err)
	}
	want := binary.BigEndian.Uint32(prefix[hdrEnd:])
	if sum := crc32.Checksum(prefix[:hdrEnd], castagnoli); sum != want {
		return Info{}, formatErr(path, ErrCorrupt, "header checksum mismatch (want %s, got %s)", formatSum(want), formatSum(sum))
	}
	if i := bytes.IndexFunc(prefix[hdrEnd+headerSumSize:], func(r rune) bool { return r != 0 }); i >= 0 {
		return Info{}, formatErr(path, ErrCorrupt, "non-zero byte in header padding at offset %d", hdrEnd+headerSumSize+int64(i))
	}
	var h Header
	if err := json.Unmarshal(prefix[fixedPrefixSize:hdrEnd], &h); err != nil {
		return Info{}, formatErr(path, ErrCorrupt, "bad header json: %v", err)
	}

	// Trailer.
	if size < dataStart+TrailerSize {
		return Info{}, formatErr(path, ErrTruncated, "trailer missing: file is %d bytes, shorter than header plus trailer (%d); it was cut off or never finished",
			size, dataStart+TrailerSize)
	}
	trailer := make([]byte, TrailerSize)
	if _, err := f.ReadAt(trailer, size-TrailerSize); err != nil {
		if err == io.EOF {
			return Info{}, formatErr(path, ErrTruncated, "file shrank while reading the trailer")
		}
		return Info{}, ioErr("read", path, err)
	}
	if string(trailer[16:]) != EndMagic {
		return Info{}, formatErr(path, ErrTruncated, "trailer missing (no end marker in the last %d bytes); the file was cut off or never finished", TrailerSize)
	}
	if want, sum := binary.BigEndian.Uint32(trailer[12:]), crc32.Checksum(trailer[:12], castagnoli); sum != want {
		return Info{}, formatErr(path, ErrCorrupt, "trailer checksum mismatch (want %s, got %s)", formatSum(want), formatSum(sum))
	}
	psize := binary.BigEndian.Uint64(trailer)
	avail := uint64(size - dataStart - TrailerSize)
	if psize > avail {
		return Info{}, formatErr(path, ErrTruncated, "trailer says the payload is %d bytes but only %d are present", psize, avail)
	}
	if psize < avail {
		return Info{}, formatErr(path, ErrCorrupt, "trailer says the payload is %d bytes but the file holds %d", psize, avail)
	}
	return Info{
		Header:        h,
		PayloadSize:   int64(psize),
		Checksum:      formatSum(binary.BigEndian.Uint32(trailer[8:])),
		Path:          path,
		FileSize:      size,
		PayloadOffset: dataStart,
	}, nil
}

// Info returns what Open learned about the file.
func (r *Reader) Info() Info { return r.info }

// Verify reads the whole payload and checks it against the checksum in the
// trailer. progress, if not nil, is called after each chunk with the bytes
// checked so far and the payload size. A mismatch is ErrCorrupt; a file that
// shrank since Open is ErrTruncated.
func (r *Reader) Verify(progress func(done, total int64)) error {
	path, total := r.info.Path, r.info.PayloadSize
	sr := io.NewSectionReader(r.f, r.info.PayloadOffset, total)
	h := crc32.New(castagnoli)
	buf := make([]byte, min(int64(verifyBufSize), max(total, 1)))
	var done int64
	for done < total {
		n, err := io.ReadFull(sr, buf[:min(int64(len(buf)), total-done)])
		h.Write(buf[:n])
		done += int64(n)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return formatErr(path, ErrTruncated, "file ended after %d of %d payload bytes", done, total)
			}
			return ioErr("read", path, err)
		}
		if progress != nil {
			progress(done, total)
		}
	}
	if progress != nil && total == 0 {
		progress(0, 0)
	}
	if got := formatSum(h.Sum32()); got != r.info.Checksum {
		return formatErr(path, ErrCorrupt, "payload checksum mismatch (want %s, got %s)", r.info.Checksum, got)
	}
	return nil
}

// Payload returns a reader of exactly the payload bytes, from the start. Each
// call returns an independent reader. If the file turns out shorter than
// Open saw, reading returns an ErrTruncated error instead of a silent short
// stream.
//
// The reader implements io.WriterTo so that io.Copy to a socket or file uses
// sendfile/splice/copy_file_range (no copy through user space).
func (r *Reader) Payload() io.Reader {
	return &payloadReader{r: r, off: r.info.PayloadOffset, end: r.info.PayloadOffset + r.info.PayloadSize}
}

// Close closes the file.
func (r *Reader) Close() error {
	if err := r.f.Close(); err != nil {
		return ioErr("close", r.info.Path, err)
	}
	return nil
}

type payloadReader struct {
	r        *Reader
	off, end int64
}

func (p *payloadReader) truncated() error {
	return formatErr(p.r.info.Path, ErrTruncated, "file ended %d bytes before the end of the payload", p.end-p.off)
}

func (p *payloadReader) Read(b []byte) (int, error) {
	if p.off >= p.end {
		return 0, io.EOF
	}
	if int64(len(b)) > p.end-p.off {
		b = b[:p.end-p.off]
	}
	n, err := p.r.f.ReadAt(b, p.off)
	p.off += int64(n)
	if err == io.EOF {
		if p.off < p.end {
			return n, p.truncated()
		}
		err = nil
	}
	if err != nil {
		return n, ioErr("read", p.r.info.Path, err)
	}
	return n, nil
}

func (p *payloadReader) WriteTo(w io.Writer) (int64, error) {
	if p.off >= p.end {
		return 0, nil
	}
	p.r.mu.Lock()
	defer p.r.mu.Unlock()
	if _, err := p.r.f.Seek(p.off, io.SeekStart); err != nil {
		return 0, ioErr("seek", p.r.info.Path, err)
	}
	// A LimitedReader around the *os.File (held in the interface) is what
	// net.Conn.ReadFrom and os.File.ReadFrom recognise for their zero-copy
	// paths.
	n, err := io.Copy(w, &io.LimitedReader{R: p.r.f, N: p.end - p.off})
	p.off += n
	if err != nil {
		return n, err
	}
	if p.off < p.end {
		return n, p.truncated()
	}
	return n, nil
}
