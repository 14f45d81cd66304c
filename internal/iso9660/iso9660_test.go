package iso9660

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/iso9660/isotest"
)

var fixedTime = time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)

// seedFiles is what a cloud-init NoCloud seed holds.
func seedFiles() []File {
	return []File{
		{Name: "user-data", Data: []byte("#cloud-config\nhostname: vm1\n")},
		{Name: "meta-data", Data: []byte("instance-id: i-1\nlocal-hostname: vm1\n")},
		{Name: "network-config", Data: []byte("version: 2\nethernets: {}\n")},
	}
}

func manyFiles(n int) []File {
	files := make([]File, n)
	for i := range files {
		files[i] = File{Name: fmt.Sprintf("file-number-%03d.conf", i), Data: []byte(strings.Repeat("x", i))}
	}
	return files
}

// writeImage writes im and checks what every image must satisfy: whole
// sectors, the returned count, and a strict read back.
func writeImage(t testing.TB, im Image) (*isotest.Volume, []byte) {
	t.Helper()
	var buf bytes.Buffer
	n, err := im.WriteTo(&buf)
	if err != nil {
		t.Fatalf("WriteTo: %v", err)
	}
	if n != int64(buf.Len()) {
		t.Fatalf("WriteTo returned %d, wrote %d bytes", n, buf.Len())
	}
	if buf.Len()%SectorSize != 0 {
		t.Fatalf("image size %d is not a multiple of %d", buf.Len(), SectorSize)
	}
	v, err := isotest.Read(buf.Bytes())
	if err != nil {
		t.Fatalf("read back: %v", err)
	}
	return v, buf.Bytes()
}

// checkFiles compares the files read back with the ones written, in any
// order.
func checkFiles(t testing.TB, v *isotest.Volume, want []File) {
	t.Helper()
	if len(v.Files) != len(want) {
		t.Fatalf("read %d files, wrote %d", len(v.Files), len(want))
	}
	for _, w := range want {
		got, ok := v.ByName(w.Name)
		if !ok {
			t.Fatalf("file %q missing; have %v", w.Name, names(v))
		}
		if !bytes.Equal(got.Data, w.Data) {
			t.Fatalf("file %q: data %q, want %q", w.Name, got.Data, w.Data)
		}
		if got.Mode != modeFile {
			t.Fatalf("file %q: mode %o, want %o", w.Name, got.Mode, modeFile)
		}
	}
}

func names(v *isotest.Volume) []string {
	var s []string
	for _, f := range v.Files {
		s = append(s, f.Name+" ("+f.ISOName+")")
	}
	return s
}

func TestWriteReadBack(t *testing.T) {
	tests := []struct {
		name     string
		volumeID string
		files    []File
		modTime  time.Time
	}{
		{name: "cloud-init seed", volumeID: "cidata", files: seedFiles(), modTime: fixedTime},
		{name: "seed without dates", volumeID: "cidata", files: seedFiles()},
		{name: "no files", volumeID: "EMPTY"},
		{name: "empty files", volumeID: "v", files: []File{{Name: "a"}, {Name: "z"}, {Name: "m", Data: []byte("m")}}},
		{name: "data spanning sectors", volumeID: "big", files: []File{
			{Name: "exact", Data: bytes.Repeat([]byte{1}, 2*SectorSize)},
			{Name: "over", Data: bytes.Repeat([]byte{2}, 2*SectorSize+1)},
			{Name: "under", Data: bytes.Repeat([]byte{3}, SectorSize-1)},
		}},
		{name: "names that collide in 8.3", volumeID: "cidata", files: []File{
			{Name: "user-data", Data: []byte("1")},
			{Name: "user_data", Data: []byte("2")},
			{Name: "USER-DATA", Data: []byte("3")},
			{Name: "user-data-longer", Data: []byte("4")},
			{Name: "user-datb", Data: []byte("5")},
		}},
		{name: "dots and odd names", volumeID: "odd", files: []File{
			{Name: "a.tar.gz"}, {Name: ".hidden"}, {Name: "trailing."}, {Name: "UPPER.TXT"},
			{Name: "with space"}, {Name: "résumé.txt", Data: []byte("ü")}, {Name: "..."},
			{Name: strings.Repeat("n", MaxNameLen), Data: []byte("longest")},
		}},
		{name: "directory spanning sectors", volumeID: "many", files: manyFiles(200), modTime: fixedTime},
		{name: "longest volume id", volumeID: "ABCDEFGHIJ KLMNOPQRST uvwxyz-_.!", files: seedFiles()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, img := writeImage(t, Image{VolumeID: tt.volumeID, Files: tt.files, ModTime: tt.modTime})
			if v.VolumeID != tt.volumeID {
				t.Fatalf("volume id %q, want %q", v.VolumeID, tt.volumeID)
			}
			if v.RockRidgeID != "RRIP_1991A" {
				t.Fatalf("Rock Ridge id %q", v.RockRidgeID)
			}
			if !v.Created.Equal(tt.modTime) {
				t.Fatalf("volume created %v, want %v", v.Created, tt.modTime)
			}
			checkFiles(t, v, tt.files)
			for _, f := range v.Files {
				if !f.ModTime.Equal(tt.modTime) {
					t.Fatalf("file %q time %v, want %v", f.Name, f.ModTime, tt.modTime)
				}
			}
			checkContiguous(t, v, len(img))
		})
	}
}

// checkContiguous checks that the file data follows the directory with
// nothing between files but padding to the next sector, and nothing after.
func checkContiguous(t testing.TB, v *isotest.Volume, imgSize int) {
	t.Helper()
	var withData []isotest.File
	for _, f := range v.Files {
		if len(f.Data) > 0 {
			withData = append(withData, f)
		}
	}
	if len(withData) == 0 {
		return
	}
	slices.SortFunc(withData, func(a, b isotest.File) int { return int(a.Extent) - int(b.Extent) })
	next := withData[0].Extent
	for _, f := range withData {
		if f.Extent != next {
			t.Fatalf("file %q starts at sector %d, want %d", f.Name, f.Extent, next)
		}
		next += uint32((len(f.Data) + SectorSize - 1) / SectorSize)
	}
	if int(next)*SectorSize != imgSize {
		t.Fatalf("data ends at sector %d, image has %d", next, imgSize/SectorSize)
	}
}

func TestWriteDirectorySpansSectors(t *testing.T) {
	v, _ := writeImage(t, Image{VolumeID: "many", Files: manyFiles(200)})
	// 200 records of ~110 bytes need several directory sectors; the first
	// file's data comes after all of them.
	if first := v.Files[0].Extent; first <= rootSector+1 {
		t.Fatalf("first data extent %d, want the directory to take several sectors after %d", first, rootSector)
	}
}

func TestWriteIsDeterministic(t *testing.T) {
	files := seedFiles()
	reversed := slices.Clone(files)
	slices.Reverse(reversed)
	var a, b bytes.Buffer
	if err := Write(&a, "cidata", files); err != nil {
		t.Fatal(err)
	}
	if err := Write(&b, "cidata", reversed); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatal("same files in another order gave a different image")
	}
}

func TestISONames(t *testing.T) {
	tests := []struct {
		names []string
		want  []string // identifiers in input order
	}{
		{[]string{"meta-data", "user-data", "network-config"}, []string{"META_DAT.;1", "USER_DAT.;1", "NETWORK_.;1"}},
		{[]string{"README.md", "a.tar.gz", ".bashrc", "x."}, []string{"README.MD;1", "A_TAR.GZ;1", "_BASHRC.;1", "X.;1"}},
		{[]string{"user-data", "user_data", "USER-DATA"}, []string{"USER_DAT.;1", "USER_DA1.;1", "USER_DA2.;1"}},
		{[]string{"a1", "a", "a-"}, []string{"A1.;1", "A.;1", "A_.;1"}},
		{[]string{"a", "A"}, []string{"A.;1", "A1.;1"}},
		{[]string{"é"}, []string{"__.;1"}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.names, ","), func(t *testing.T) {
			used := map[string]bool{}
			for i, n := range tt.names {
				base, ext := uniqueISOName(n, used)
				if got := base + "." + ext + ";1"; got != tt.want[i] {
					t.Fatalf("%q: got %q, want %q", n, got, tt.want[i])
				}
			}
		})
	}
}

func TestWriteRejects(t *testing.T) {
	tests := []struct {
		name string
		im   Image
		want error
	}{
		{"empty volume id", Image{VolumeID: ""}, ErrInvalid},
		{"long volume id", Image{VolumeID: strings.Repeat("a", 33)}, ErrInvalid},
		{"volume id with newline", Image{VolumeID: "a\nb"}, ErrInvalid},
		{"volume id with trailing space", Image{VolumeID: "cidata "}, ErrInvalid},
		{"volume id not ASCII", Image{VolumeID: "cïdata"}, ErrInvalid},
		{"empty name", Image{VolumeID: "v", Files: []File{{Name: ""}}}, ErrInvalid},
		{"dot", Image{VolumeID: "v", Files: []File{{Name: "."}}}, ErrInvalid},
		{"dot dot", Image{VolumeID: "v", Files: []File{{Name: ".."}}}, ErrInvalid},
		{"slash", Image{VolumeID: "v", Files: []File{{Name: "dir/file"}}}, ErrInvalid},
		{"control character", Image{VolumeID: "v", Files: []File{{Name: "a\tb"}}}, ErrInvalid},
		{"NUL", Image{VolumeID: "v", Files: []File{{Name: "a\x00"}}}, ErrInvalid},
		{"not UTF-8", Image{VolumeID: "v", Files: []File{{Name: "a\xff"}}}, ErrInvalid},
		{"name too long", Image{VolumeID: "v", Files: []File{{Name: strings.Repeat("n", MaxNameLen+1)}}}, ErrInvalid},
		{"duplicate", Image{VolumeID: "v", Files: []File{{Name: "a"}, {Name: "a"}}}, ErrInvalid},
		{"year before 1900", Image{VolumeID: "v", ModTime: time.Date(1899, 12, 31, 0, 0, 0, 0, time.UTC)}, ErrInvalid},
		{"year after 2155", Image{VolumeID: "v", ModTime: time.Date(2156, 1, 1, 0, 0, 0, 0, time.UTC)}, ErrInvalid},
		{"too many files", Image{VolumeID: "v", Files: manyFiles(MaxFiles + 1)}, ErrTooLarge},
		{"one file too big", Image{VolumeID: "v", Files: []File{{Name: "a", Data: make([]byte, MaxImageSize)}}}, ErrTooLarge},
		{"files too big together", Image{VolumeID: "v", Files: []File{
			{Name: "a", Data: make([]byte, MaxImageSize/2)}, {Name: "b", Data: make([]byte, MaxImageSize/2)},
		}}, ErrTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			_, err := tt.im.WriteTo(&buf)
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if buf.Len() != 0 {
				t.Fatalf("wrote %d bytes before failing", buf.Len())
			}
		})
	}
}

func TestWriteAcceptsLargestImage(t *testing.T) {
	// Everything before the data takes rootSector+1 sectors here.
	size := MaxImageSize - (rootSector+1)*SectorSize
	v, img := writeImage(t, Image{VolumeID: "v", Files: []File{{Name: "a", Data: bytes.Repeat([]byte{7}, size)}}})
	if len(img) != MaxImageSize {
		t.Fatalf("image is %d bytes, want %d", len(img), MaxImageSize)
	}
	checkFiles(t, v, []File{{Name: "a", Data: bytes.Repeat([]byte{7}, size)}})
}

type failWriter struct{ after int }

func (w *failWriter) Write(p []byte) (int, error) {
	if w.after <= 0 {
		return 0, errors.New("disk full")
	}
	n := min(len(p), w.after)
	w.after -= n
	if n < len(p) {
		return n, errors.New("disk full")
	}
	return n, nil
}

func TestWriteReportsWriterError(t *testing.T) {
	for _, after := range []int{0, 100, (rootSector + 1) * SectorSize} {
		t.Run(fmt.Sprint(after), func(t *testing.T) {
			w := &failWriter{after: after}
			n, err := Image{VolumeID: "cidata", Files: seedFiles()}.WriteTo(w)
			if err == nil || !strings.Contains(err.Error(), "disk full") {
				t.Fatalf("got %v, want the writer's error", err)
			}
			if n != int64(after) {
				t.Fatalf("reported %d bytes written, want %d", n, after)
			}
		})
	}
}

// TestLayout pins the fields that blkid and Linux look at first, so a
// change to them shows up here and not only in a guest.
func TestLayout(t *testing.T) {
	_, img := writeImage(t, Image{VolumeID: "cidata", Files: seedFiles()})
	pvd := img[16*SectorSize:]
	tests := []struct {
		name string
		off  int
		want string
	}{
		{"descriptor header", 0, "\x01CD001\x01"},
		{"volume id", 40, "cidata" + strings.Repeat(" ", 26)},
		{"block size", 128, "\x00\x08\x08\x00"},
		{"root record length", 156, "\x22"},
		{"root SP entry", (rootSector-16)*SectorSize + 34, "SP\x07\x01\xbe\xef\x00"},
		{"ER entry", (ceSector-16)*SectorSize + 8, "RRIP_1991A"},
	}
	for _, tt := range tests {
		if got := string(pvd[tt.off : tt.off+len(tt.want)]); got != tt.want {
			t.Errorf("%s: got %q, want %q", tt.name, got, tt.want)
		}
	}
}
