package iso9660

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/iso9660/isotest"
)

// FuzzWrite checks that Write never panics, refuses only with its own
// errors and before writing anything, and that every image it does write
// reads back with the same label, names and contents.
//
// names holds the file names separated by NUL (which no name may contain);
// data holds their contents separated by 0xff; unix is the modification
// time, 0 for none.
func FuzzWrite(f *testing.F) {
	f.Add("cidata", "meta-data\x00user-data\x00network-config", []byte("instance-id: a\xff#cloud-config\n\xffversion: 2"), int64(0))
	f.Add("v", "a\x00A\x00a-\x00a_", []byte("1\xff2\xff\xff"), fixedTime.Unix())
	f.Add("", "", []byte{}, int64(-1))
	f.Add("x y", "..\x00.\x00/\x00a/b", []byte{}, int64(1<<40))
	f.Add("big", "a", bytes.Repeat([]byte{1}, 3*SectorSize), int64(0))
	f.Fuzz(func(t *testing.T, volumeID, names string, data []byte, unix int64) {
		var files []File
		if names != "" {
			contents := bytes.Split(data, []byte{0xff})
			for i, n := range strings.Split(names, "\x00") {
				var d []byte
				if i < len(contents) {
					d = contents[i]
				}
				files = append(files, File{Name: n, Data: d})
			}
		}
		var mod time.Time
		if unix != 0 {
			mod = time.Unix(unix, 0).UTC()
		}
		var buf bytes.Buffer
		_, err := Image{VolumeID: volumeID, Files: files, ModTime: mod}.WriteTo(&buf)
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrTooLarge) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			if buf.Len() != 0 {
				t.Fatalf("wrote %d bytes before failing: %v", buf.Len(), err)
			}
			return
		}
		v, err := isotest.Read(buf.Bytes())
		if err != nil {
			t.Fatalf("read back: %v", err)
		}
		if v.VolumeID != volumeID {
			t.Fatalf("volume id %q, want %q", v.VolumeID, volumeID)
		}
		checkFiles(t, v, files)
	})
}
