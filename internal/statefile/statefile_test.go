package statefile

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func testHeader() Header {
	return Header{
		VM:          "web-1",
		Hardware:    json.RawMessage(`{"memory_mib":2048,"cpus":2,"machine":"q35","devices":[{"type":"virtio-net"}]}`),
		QEMUVersion: "9.2.0",
		Kind:        KindSuspend,
		CreatedAt:   time.Date(2026, 3, 4, 5, 6, 7, 890, time.UTC),
	}
}

// genPayload returns n deterministic pseudo-random bytes.
func genPayload(n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{1, 2, 3})
	r.Read(b)
	return b
}

// writeFile writes a state file with the given payload and returns its info.
func writeFile(t testing.TB, path string, h Header, payload []byte) Info {
	t.Helper()
	w, err := Create(path, h)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if _, err := w.ReadFrom(bytes.NewReader(payload)); err != nil {
		t.Fatalf("ReadFrom: %v", err)
	}
	info, err := w.Commit()
	if err != nil {
		t.Fatalf("Commit: %v", err)
	}
	return info
}

func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("ReadDir: %v", err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func TestRoundTrip(t *testing.T) {
	tests := []struct {
		name    string
		size    int
		chunk   int  // Write chunk size; 0 means ReadFrom
		oneShot bool // single Write of everything
	}{
		{name: "empty", size: 0},
		{name: "one byte", size: 1},
		{name: "small writes", size: 100_003, chunk: 777},
		{name: "exact buffer", size: writeBufSize, chunk: 4096},
		{name: "buffer plus one", size: writeBufSize + 1},
		{name: "64MiB readfrom", size: 64 << 20},
		{name: "64MiB 64KiB writes", size: 64 << 20, chunk: 64 << 10},
		{name: "64MiB one write", size: 64 << 20, oneShot: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if testing.Short() && tt.size > 8<<20 {
				t.Skip("large payload")
			}
			dir := t.TempDir()
			path := filepath.Join(dir, "state.vigil")
			payload := genPayload(tt.size)
			h := testHeader()
			w, err := Create(path, h)
			if err != nil {
				t.Fatalf("Create: %v", err)
			}
			switch {
			case tt.oneShot:
				if n, err := w.Write(payload); err != nil || n != len(payload) {
					t.Fatalf("Write = %d, %v", n, err)
				}
			case tt.chunk > 0:
				for p := payload; len(p) > 0; {
					c := min(tt.chunk, len(p))
					if n, err := w.Write(p[:c]); err != nil || n != c {
						t.Fatalf("Write = %d, %v", n, err)
					}
					p = p[c:]
				}
			default:
				// Hide WriterTo so ReadFrom's own loop is used.
				if n, err := w.ReadFrom(struct{ io.Reader }{bytes.NewReader(payload)}); err != nil || n != int64(len(payload)) {
					t.Fatalf("ReadFrom = %d, %v", n, err)
				}
			}
			if got := w.Written(); got != int64(len(payload)) {
				t.Fatalf("Written = %d, want %d", got, len(payload))
			}
			winfo, err := w.Commit()
			if err != nil {
				t.Fatalf("Commit: %v", err)
			}
			if names := dirEntries(t, dir); len(names) != 1 || names[0] != "state.vigil" {
				t.Fatalf("dir after Commit = %v, want only state.vigil", names)
			}
			wantSum := fmt.Sprintf("%08x", crc32.Checksum(payload, crc32.MakeTable(crc32.Castagnoli)))
			if winfo.Checksum != wantSum || winfo.PayloadSize != int64(len(payload)) {
				t.Fatalf("Commit info = %d %s, want %d %s", winfo.PayloadSize, winfo.Checksum, len(payload), wantSum)
			}
			st, err := os.Stat(path)
			if err != nil {
				t.Fatalf("Stat: %v", err)
			}
			if st.Mode().Perm() != 0o600 {
				t.Fatalf("mode = %v, want 0600", st.Mode().Perm())
			}

			r, err := Open(path)
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer r.Close()
			info := r.Info()
			if info.PayloadSize != int64(len(payload)) || info.Checksum != wantSum || info.Path != path ||
				info.FileSize != st.Size() || info.FileSize != winfo.FileSize || info.PayloadOffset != winfo.PayloadOffset ||
				info.PayloadOffset%PayloadAlign != 0 {
				t.Fatalf("Open info = %+v, commit info = %+v, file size %d", info, winfo, st.Size())
			}
			var calls int
			var last int64
			err = r.Verify(func(done, total int64) {
				calls++
				if total != int64(len(payload)) || done < last || done > total {
					t.Fatalf("progress(%d, %d) after %d", done, total, last)
				}
				last = done
			})
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if calls == 0 || last != int64(len(payload)) {
				t.Fatalf("progress: %d calls, last %d", calls, last)
			}
			// Payload via Read (hide WriterTo) and via WriteTo into a file.
			got, err := io.ReadAll(struct{ io.Reader }{r.Payload()})
			if err != nil || !bytes.Equal(got, payload) {
				t.Fatalf("Payload Read: %d bytes, %v; want %d bytes equal", len(got), err, len(payload))
			}
			out, err := os.Create(filepath.Join(t.TempDir(), "out"))
			if err != nil {
				t.Fatal(err)
			}
			defer out.Close()
			if n, err := io.Copy(out, r.Payload()); err != nil || n != int64(len(payload)) {
				t.Fatalf("Payload WriteTo = %d, %v", n, err)
			}
			got, err = os.ReadFile(out.Name())
			if err != nil || !bytes.Equal(got, payload) {
				t.Fatalf("Payload WriteTo content differs (%d bytes, %v)", len(got), err)
			}
		})
	}
}

func TestHeaderPreserved(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	h := testHeader()
	h.Kind = KindSnapshot
	h.CreatedAt = time.Date(2025, 12, 31, 23, 59, 59, 123456789, time.FixedZone("x", 3600))
	writeFile(t, path, h, []byte("payload"))
	r, err := Open(path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer r.Close()
	got := r.Info().Header
	if got.VM != h.VM || got.QEMUVersion != h.QEMUVersion || got.Kind != h.Kind || !got.CreatedAt.Equal(h.CreatedAt) {
		t.Fatalf("header = %+v, want %+v", got, h)
	}
	var a, b any
	if err := json.Unmarshal(got.Hardware, &a); err != nil {
		t.Fatalf("hardware json: %v", err)
	}
	json.Unmarshal(h.Hardware, &b)
	if fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatalf("hardware = %s, want %s", got.Hardware, h.Hardware)
	}
}

func TestCreatedAtDefaultsToNow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s")
	h := testHeader()
	h.CreatedAt = time.Time{}
	before := time.Now()
	info := writeFile(t, path, h, nil)
	if info.CreatedAt.Before(before.Add(-time.Second)) || info.CreatedAt.After(time.Now().Add(time.Second)) {
		t.Fatalf("CreatedAt = %v, want about %v", info.CreatedAt, before)
	}
}

func TestCreateRejectsBadHeader(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		mod  func(*Header)
		want string
	}{
		{"no vm", func(h *Header) { h.VM = "" }, "no vm name"},
		{"bad kind", func(h *Header) { h.Kind = "hibernate" }, `kind "hibernate"`},
		{"bad hardware json", func(h *Header) { h.Hardware = json.RawMessage(`{`) }, "encode header"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := testHeader()
			tt.mod(&h)
			w, err := Create(filepath.Join(dir, "s"), h)
			if err == nil {
				w.Abort()
				t.Fatalf("Create succeeded, want error")
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), dir) {
				t.Fatalf("error %q does not mention %q and the path", err, tt.want)
			}
			if names := dirEntries(t, dir); len(names) != 0 {
				t.Fatalf("dir = %v, want empty", names)
			}
		})
	}
}

func TestNothingUnderPathBeforeCommit(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.vigil")
	w, err := Create(path, testHeader())
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	defer w.Abort()
	if _, err := w.Write(genPayload(10 << 20)); err != nil {
		t.Fatalf("Write: %v", err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Lstat(path) before Commit: %v, want not-exist", err)
	}
	if _, err := Open(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Open before Commit: %v, want not-exist", err)
	}
	names := dirEntries(t, dir)
	if len(names) != 1 || !strings.HasPrefix(names[0], ".state.vigil.tmp") {
		t.Fatalf("dir = %v, want one hidden temp file", names)
	}
	if _, err := w.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	if names := dirEntries(t, dir); len(names) != 1 || names[0] != "state.vigil" {
		t.Fatalf("dir after Commit = %v", names)
	}
}

func TestCommitReplacesExisting(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s")
	writeFile(t, path, testHeader(), []byte("old"))
	writeFile(t, path, testHeader(), []byte("new payload"))
	r, err := Open(path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer r.Close()
	got, _ := io.ReadAll(r.Payload())
	if string(got) != "new payload" {
		t.Fatalf("payload = %q", got)
	}
	if names := dirEntries(t, dir); len(names) != 1 {
		t.Fatalf("dir = %v", names)
	}
}

func TestAbort(t *testing.T) {
	tests := []struct {
		name string
		do   func(t *testing.T, w *Writer)
	}{
		{"right after create", func(t *testing.T, w *Writer) {}},
		{"after writes", func(t *testing.T, w *Writer) {
			if _, err := w.Write(genPayload(9 << 20)); err != nil {
				t.Fatalf("Write: %v", err)
			}
		}},
		{"after partial buffer", func(t *testing.T, w *Writer) {
			if _, err := w.Write([]byte("abc")); err != nil {
				t.Fatalf("Write: %v", err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "s")
			w, err := Create(path, testHeader())
			if err != nil {
				t.Fatalf("Create: %v", err)
			}
			tt.do(t, w)
			for i := range 3 {
				if err := w.Abort(); err != nil {
					t.Fatalf("Abort #%d: %v", i+1, err)
				}
			}
			if names := dirEntries(t, dir); len(names) != 0 {
				t.Fatalf("dir after Abort = %v, want empty", names)
			}
			if _, err := w.Write([]byte("x")); err == nil {
				t.Fatalf("Write after Abort succeeded")
			}
			if _, err := w.Commit(); err == nil {
				t.Fatalf("Commit after Abort succeeded")
			}
			if names := dirEntries(t, dir); len(names) != 0 {
				t.Fatalf("dir = %v, want empty", names)
			}
		})
	}
}

func TestAbortAfterCommitKeepsFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s")
	w, err := Create(path, testHeader())
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	w.Write([]byte("data"))
	if _, err := w.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	if err := w.Abort(); err != nil {
		t.Fatalf("Abort after Commit: %v", err)
	}
	if _, err := w.Commit(); err == nil {
		t.Fatalf("second Commit succeeded")
	}
	if _, err := w.Write([]byte("x")); err == nil {
		t.Fatalf("Write after Commit succeeded")
	}
	r, err := Open(path)
	if err != nil {
		t.Fatalf("Open after Abort-after-Commit: %v", err)
	}
	r.Close()
}

type failingReader struct {
	data []byte
	err  error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if len(f.data) == 0 {
		return 0, f.err
	}
	n := copy(p, f.data)
	f.data = f.data[n:]
	return n, nil
}

func TestReadFromSourceError(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s")
	w, err := Create(path, testHeader())
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	srcErr := errors.New("qemu socket reset")
	n, err := w.ReadFrom(&failingReader{data: genPayload(5 << 20), err: srcErr})
	if !errors.Is(err, srcErr) || n != 5<<20 {
		t.Fatalf("ReadFrom = %d, %v; want %d, %v", n, err, 5<<20, srcErr)
	}
	if !strings.Contains(err.Error(), path) {
		t.Fatalf("error %q does not name the path", err)
	}
	if _, err := w.Write([]byte("more")); !errors.Is(err, srcErr) {
		t.Fatalf("Write after failure = %v, want the source error", err)
	}
	if _, err := w.Commit(); !errors.Is(err, srcErr) {
		t.Fatalf("Commit after failure = %v, want the source error", err)
	}
	if names := dirEntries(t, dir); len(names) != 0 {
		t.Fatalf("dir after failed Commit = %v, want empty", names)
	}
	if err := w.Abort(); err != nil {
		t.Fatalf("Abort after failed Commit: %v", err)
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { return 0, nil }

func TestReadFromNoProgress(t *testing.T) {
	dir := t.TempDir()
	w, err := Create(filepath.Join(dir, "s"), testHeader())
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if _, err := w.ReadFrom(zeroReader{}); !errors.Is(err, io.ErrNoProgress) {
		t.Fatalf("ReadFrom = %v, want ErrNoProgress", err)
	}
	w.Abort()
	if names := dirEntries(t, dir); len(names) != 0 {
		t.Fatalf("dir = %v", names)
	}
}

func TestWriteFailure(t *testing.T) {
	// Close the underlying file behind the Writer's back so the next
	// write(2) fails; the Writer must fail and clean up.
	dir := t.TempDir()
	w, err := Create(filepath.Join(dir, "s"), testHeader())
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	w.f.Close()
	if _, err := w.Write(genPayload(writeBufSize)); err == nil {
		t.Fatalf("Write to closed file succeeded")
	}
	if _, err := w.Commit(); err == nil {
		t.Fatalf("Commit after failed Write succeeded")
	}
	if names := dirEntries(t, dir); len(names) != 0 {
		t.Fatalf("dir = %v, want empty", names)
	}
}

func TestCommitFailureLeavesNoTemp(t *testing.T) {
	// Rename into a directory that has disappeared fails; Commit must
	// remove the temporary file.
	base := t.TempDir()
	dir := filepath.Join(base, "d")
	os.Mkdir(dir, 0o700)
	w, err := Create(filepath.Join(dir, "sub", "s"), testHeader())
	if err == nil {
		w.Abort()
		t.Fatalf("Create in a missing directory succeeded")
	}
	w, err = Create(filepath.Join(dir, "s"), testHeader())
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	w.Write([]byte("abc"))
	w.path = filepath.Join(dir, "missing", "s") // rename target in a missing dir
	if _, err := w.Commit(); err == nil {
		t.Fatalf("Commit succeeded")
	} else if !strings.Contains(err.Error(), "rename") {
		t.Fatalf("Commit error %q does not say rename", err)
	}
	if names := dirEntries(t, dir); len(names) != 0 {
		t.Fatalf("dir after failed Commit = %v, want empty", names)
	}
}

func TestWrittenConcurrent(t *testing.T) {
	// Written is read from another goroutine while ReadFrom runs (-race).
	w, err := Create(filepath.Join(t.TempDir(), "s"), testHeader())
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	defer w.Abort()
	pr, pw := io.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		var last int64
		for i := 0; i < 1000; i++ {
			n := w.Written()
			if n < last {
				t.Errorf("Written went backwards: %d < %d", n, last)
				return
			}
			last = n
		}
	}()
	go func() {
		data := genPayload(3 << 20)
		for p := data; len(p) > 0; p = p[min(len(p), 100_000):] {
			pw.Write(p[:min(len(p), 100_000)])
		}
		pw.Close()
	}()
	n, err := w.ReadFrom(pr)
	<-done
	if err != nil || n != 3<<20 || w.Written() != 3<<20 {
		t.Fatalf("ReadFrom = %d, %v; Written = %d", n, err, w.Written())
	}
}

// validFile writes a small state file and returns its path and bytes.
func validFile(t testing.TB, payload []byte) (string, []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "state.vigil")
	writeFile(t, path, testHeader(), payload)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("ReadFile: %v", err)
	}
	return path, b
}

// openVerify opens path and verifies it, returning the first error.
func openVerify(path string) error {
	r, err := Open(path)
	if err != nil {
		return err
	}
	defer r.Close()
	return r.Verify(nil)
}

func TestDamage(t *testing.T) {
	payload := genPayload(10_000)
	path, good := validFile(t, payload)
	dataStart := int(alignUp(int64(fixedPrefixSize + len(mustJSON(t)) + headerSumSize)))
	if len(good) != dataStart+len(payload)+TrailerSize {
		t.Fatalf("file is %d bytes, expected layout gives %d", len(good), dataStart+len(payload)+TrailerSize)
	}
	mod := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	flip := func(i int) []byte { return mod(func(b []byte) []byte { b[i] ^= 0x40; return b }) }
	withVersion := func(v uint32) []byte {
		return mod(func(b []byte) []byte { binary.BigEndian.PutUint32(b[len(Magic):], v); return b })
	}
	tests := []struct {
		name     string
		content  []byte
		want     error
		openOK   bool   // Open succeeds, Verify fails
		contains string // in the error message
	}{
		{"intact", good, nil, true, ""},
		{"payload byte flipped", flip(dataStart + 5000), ErrCorrupt, true, "payload checksum mismatch"},
		{"first payload byte flipped", flip(dataStart), ErrCorrupt, true, "payload checksum mismatch"},
		{"payload checksum flipped", flip(len(good) - TrailerSize + 10), ErrCorrupt, false, "trailer checksum mismatch"},
		{"payload checksum flipped, trailer crc fixed", mod(func(b []byte) []byte { b[len(b)-TrailerSize+10]++; return fixTrailer(b) }), ErrCorrupt, true, "payload checksum mismatch"},
		{"trailer crc flipped", flip(len(good) - TrailerSize + 13), ErrCorrupt, false, "trailer checksum mismatch"},
		{"header json invalid, header crc fixed", mod(func(b []byte) []byte { b[fixedPrefixSize] = '['; return fixHeader(b) }), ErrCorrupt, false, "bad header json"},
		{"header json byte flipped", flip(fixedPrefixSize + 3), ErrCorrupt, false, "header checksum mismatch"},
		{"header checksum flipped", flip(fixedPrefixSize + len(mustJSON(t)) + 1), ErrCorrupt, false, "header checksum mismatch"},
		{"padding byte set", flip(dataStart - 1), ErrCorrupt, false, "padding"},
		{"header length grown", mod(func(b []byte) []byte { b[fixedPrefixSize-1]++; return b }), ErrCorrupt, false, "header checksum"},
		{"header length huge", mod(func(b []byte) []byte { b[fixedPrefixSize-4] = 0xff; return b }), ErrCorrupt, false, "exceeds the limit"},
		{"trailer size flipped", flip(len(good) - TrailerSize + 7), ErrCorrupt, false, "trailer checksum mismatch"},
		{"trailer size too big", mod(func(b []byte) []byte { b[len(b)-TrailerSize+7]++; return fixTrailer(b) }), ErrTruncated, false, "only"},
		{"trailer size too small", mod(func(b []byte) []byte { b[len(b)-TrailerSize+7]--; return fixTrailer(b) }), ErrCorrupt, false, "trailer says"},
		{"truncated by 1 byte", good[:len(good)-1], ErrTruncated, false, "trailer missing"},
		{"truncated by trailer", good[:len(good)-TrailerSize], ErrTruncated, false, "trailer missing"},
		{"truncated by half", good[:len(good)/2], ErrTruncated, false, "trailer missing"},
		{"truncated inside header", good[:100], ErrTruncated, false, "header extends"},
		{"truncated inside fixed header", good[:15], ErrTruncated, false, "fixed header"},
		{"truncated inside magic", good[:4], ErrTruncated, false, "fixed header"},
		{"truncated to zero", nil, ErrTruncated, false, "empty"},
		{"appended garbage", append(bytes.Clone(good), "junk"...), ErrTruncated, false, "trailer missing"},
		{"wrong magic", mod(func(b []byte) []byte { copy(b, "QEMU"); return b }), ErrNotStateFile, false, "bad magic"},
		{"short non-state file", []byte("hi\n"), ErrNotStateFile, false, "bad magic"},
		{"text file", []byte(strings.Repeat("hello world\n", 1000)), ErrNotStateFile, false, "bad magic"},
		{"future version", withVersion(2), ErrVersion, false, "format version 2"},
		{"version zero", withVersion(0), ErrVersion, false, "format version 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "state.vigil")
			if err := os.WriteFile(p, tt.content, 0o600); err != nil {
				t.Fatal(err)
			}
			r, err := Open(p)
			if err == nil {
				if !tt.openOK {
					r.Close()
					t.Fatalf("Open succeeded, want %v", tt.want)
				}
				err = r.Verify(nil)
				r.Close()
			} else if tt.openOK {
				t.Fatalf("Open: %v", err)
			}
			if tt.want == nil {
				if err != nil {
					t.Fatalf("err = %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("err = %v, want errors.Is %v", err, tt.want)
			}
			var fe *FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("err %T is not a *FormatError", err)
			}
			msg := err.Error()
			if !strings.Contains(msg, p) || !strings.Contains(msg, tt.contains) || msg != strings.ToLower(msg[:1])+msg[1:] {
				t.Fatalf("error message %q should name %s and contain %q", msg, p, tt.contains)
			}
		})
	}
	_ = path
}

// fixTrailer recomputes the trailer's own CRC after a test modified it.
func fixTrailer(b []byte) []byte {
	t := b[len(b)-TrailerSize:]
	binary.BigEndian.PutUint32(t[12:], crc32.Checksum(t[:12], castagnoli))
	return b
}

// fixHeader recomputes the header CRC after a test modified the JSON.
func fixHeader(b []byte) []byte {
	end := fixedPrefixSize + int(binary.BigEndian.Uint32(b[len(Magic)+4:]))
	binary.BigEndian.PutUint32(b[end:], crc32.Checksum(b[:end], castagnoli))
	return b
}

func mustJSON(t testing.TB) []byte {
	b, err := json.Marshal(testHeader())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestEveryByteFlipDetected flips each byte of a small file in turn; Open or
// Verify must report an error every time.
func TestEveryByteFlipDetected(t *testing.T) {
	_, good := validFile(t, genPayload(300))
	p := filepath.Join(t.TempDir(), "s")
	for i := range good {
		b := bytes.Clone(good)
		b[i] ^= 0x01
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		err := openVerify(p)
		if err == nil {
			t.Fatalf("flip at byte %d of %d not detected", i, len(good))
		}
		var fe *FormatError
		if !errors.As(err, &fe) {
			t.Fatalf("flip at byte %d: error %v is not a *FormatError", i, err)
		}
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("Open(missing) = %v", err)
	}
	if _, err := Open(dir); !errors.Is(err, ErrNotStateFile) {
		t.Fatalf("Open(dir) = %v, want ErrNotStateFile", err)
	}
}

func TestVerifyDetectsShrink(t *testing.T) {
	path, good := validFile(t, genPayload(100_000))
	r, err := Open(path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer r.Close()
	if err := os.Truncate(path, int64(len(good)/2)); err != nil {
		t.Fatal(err)
	}
	if err := r.Verify(nil); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Verify after shrink = %v, want ErrTruncated", err)
	}
	if _, err := io.ReadAll(struct{ io.Reader }{r.Payload()}); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Payload Read after shrink = %v, want ErrTruncated", err)
	}
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, r.Payload()); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Payload WriteTo after shrink = %v, want ErrTruncated", err)
	}
}

func FuzzOpen(f *testing.F) {
	_, good := validFile(f, []byte("some payload bytes"))
	f.Add(good)
	f.Add(good[:len(good)-1])
	f.Add(good[:len(good)/2])
	f.Add(good[:20])
	f.Add([]byte{})
	f.Add([]byte(Magic))
	bad := bytes.Clone(good)
	binary.BigEndian.PutUint32(bad[len(Magic)+4:], 0xffffffff)
	f.Add(bad)
	f.Fuzz(func(t *testing.T, data []byte) {
		// In memory: the same parser as Open, without the file system
		// (which stalls Go's fuzzing workers on this kind of machine).
		r, err := open(newMemFile(data), "fuzz.vigil")
		if err != nil {
			var fe *FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("Open error %v is not a *FormatError", err)
			}
			return
		}
		defer r.Close()
		info := r.Info()
		if info.PayloadOffset+info.PayloadSize+TrailerSize != int64(len(data)) {
			t.Fatalf("inconsistent info %+v for %d bytes", info, len(data))
		}
		if err := r.Verify(func(done, total int64) {}); err == nil {
			got, err := io.ReadAll(r.Payload())
			if err != nil || int64(len(got)) != info.PayloadSize {
				t.Fatalf("Payload after Verify: %d bytes, %v", len(got), err)
			}
		}
	})
}

// ---- benchmarks ----

const benchSize = 256 << 20

var benchData = sync.OnceValue(func() []byte { return genPayload(benchSize) })

// feed writes data to w in 256 KiB pieces, like a socket copy would.
func feed(b *testing.B, w io.Writer, data []byte) {
	for p := data; len(p) > 0; {
		c := min(256<<10, len(p))
		if _, err := w.Write(p[:c]); err != nil {
			b.Fatalf("Write: %v", err)
		}
		p = p[c:]
	}
}

// BenchmarkWrite measures a full state file write: header, payload streamed
// in 256 KiB pieces, trailer, fsync, rename, directory fsync. Set
// STATEFILE_BENCH_DIR (e.g. /dev/shm) to write somewhere other than the
// default temporary directory.
func BenchmarkWrite(b *testing.B) {
	data := benchData()
	dir := b.TempDir()
	if d := os.Getenv("STATEFILE_BENCH_DIR"); d != "" {
		dir, _ = os.MkdirTemp(d, "bench")
		defer os.RemoveAll(dir)
	}
	path := filepath.Join(dir, "state.vigil")
	b.SetBytes(int64(len(data)))
	b.ResetTimer()
	for b.Loop() {
		w, err := Create(path, testHeader())
		if err != nil {
			b.Fatalf("Create: %v", err)
		}
		feed(b, w, data)
		if _, err := w.Commit(); err != nil {
			b.Fatalf("Commit: %v", err)
		}
	}
}

// BenchmarkPlainBufferedWrite is the baseline: the same bytes through a
// 4 MiB bufio.Writer into a plain file, then fsync. No checksum, no rename.
func BenchmarkPlainBufferedWrite(b *testing.B) {
	data := benchData()
	dir := b.TempDir()
	if d := os.Getenv("STATEFILE_BENCH_DIR"); d != "" {
		dir, _ = os.MkdirTemp(d, "bench")
		defer os.RemoveAll(dir)
	}
	path := filepath.Join(dir, "plain")
	b.SetBytes(int64(len(data)))
	b.ResetTimer()
	for b.Loop() {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		bw := bufio.NewWriterSize(f, writeBufSize)
		feed(b, bw, data)
		if err := bw.Flush(); err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
}

// BenchmarkChecksum compares the candidate checksums' raw speed on this CPU
// (the reason for choosing CRC-32C, see the package doc).
func BenchmarkChecksum(b *testing.B) {
	data := benchData()[:64<<20]
	for _, c := range []struct {
		name string
		new  func() hash.Hash
	}{
		{"crc32c", func() hash.Hash { return crc32.New(castagnoli) }},
		{"sha256", sha256.New},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				h := c.new()
				h.Write(data)
				h.Sum(nil)
			}
		})
	}
}

// BenchmarkVerify measures Open+Verify of a file (from the page cache).
func BenchmarkVerify(b *testing.B) {
	data := benchData()
	path := filepath.Join(b.TempDir(), "s")
	writeFile(b, path, testHeader(), data)
	b.SetBytes(int64(len(data)))
	b.ResetTimer()
	for b.Loop() {
		r, err := Open(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := r.Verify(nil); err != nil {
			b.Fatal(err)
		}
		r.Close()
	}
}
