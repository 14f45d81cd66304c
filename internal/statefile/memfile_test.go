package statefile

import (
	"bytes"
	"io/fs"
	"time"
)

// memFile is a state file in memory, for the fuzzer.
type memFile struct {
	*bytes.Reader
	size int64
}

func newMemFile(b []byte) *memFile { return &memFile{Reader: bytes.NewReader(b), size: int64(len(b))} }

func (m *memFile) Close() error               { return nil }
func (m *memFile) Stat() (fs.FileInfo, error) { return memInfo{m.size}, nil }

type memInfo struct{ size int64 }

func (i memInfo) Name() string       { return "mem.vigil" }
func (i memInfo) Size() int64        { return i.size }
func (i memInfo) Mode() fs.FileMode  { return 0o600 }
func (i memInfo) ModTime() time.Time { return time.Time{} }
func (i memInfo) IsDir() bool        { return false }
func (i memInfo) Sys() any           { return nil }
