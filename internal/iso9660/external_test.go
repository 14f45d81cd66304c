package iso9660

import (
	"bytes"
	"testing"

	"github.com/vigil-project/vigil/internal/iso9660/isotest"
)

// TestExternalTools has the real tools read the images: blkid (util-linux)
// for the label, isoinfo (genisoimage) and xorriso (xorriso) for the Rock
// Ridge names and the contents. Missing tools are skipped.
func TestExternalTools(t *testing.T) {
	tests := []struct {
		name  string
		label string
		files []File
	}{
		{"cloud-init seed", "cidata", seedFiles()},
		{"no files", "EMPTY", nil},
		{"empty file last", "cidata", []File{{Name: "meta-data", Data: []byte("instance-id: a\n")}, {Name: "zz-empty"}}},
		{"colliding and long names", "names", []File{
			{Name: "user-data", Data: []byte("1")},
			{Name: "user_data", Data: []byte("2")},
			{Name: "USER-DATA", Data: []byte("3")},
			{Name: "a.tar.gz", Data: []byte("4")},
			{Name: ".hidden", Data: []byte("5")},
			{Name: "with space", Data: []byte("6")},
			{Name: string(bytes.Repeat([]byte("n"), MaxNameLen)), Data: []byte("7")},
			{Name: "big", Data: bytes.Repeat([]byte("0123456789abcdef"), 1000)},
		}},
		{"directory spanning sectors", "many", manyFiles(200)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, img := writeImage(t, Image{VolumeID: tt.label, Files: tt.files, ModTime: fixedTime})
			want := map[string][]byte{}
			for _, f := range tt.files {
				want[f.Name] = f.Data
			}
			isotest.CheckWithTools(t, img, tt.label, want)
		})
	}
}
