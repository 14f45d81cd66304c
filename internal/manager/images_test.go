package manager

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/testenv"
)

// testImage makes an image file of kind qcow2, raw, iso, backed or text.
func testImage(t *testing.T, kind string) string {
	t.Helper()
	testenv.NeedProgram(t, "qemu-img", "qemu-utils")
	dir := t.TempDir()
	p := filepath.Join(dir, kind)
	qemuImg := func(args ...string) {
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
		}
	}
	switch kind {
	case "qcow2":
		qemuImg("create", "-q", "-f", "qcow2", p, "64M")
	case "raw":
		b := make([]byte, 1<<20)
		b[510], b[511] = 0x55, 0xaa
		os.WriteFile(p, b, 0o644)
	case "iso":
		b := make([]byte, 20*2048)
		copy(b[16*2048+1:], "CD001")
		os.WriteFile(p, b, 0o644)
	case "backed":
		base := filepath.Join(dir, "base")
		qemuImg("create", "-q", "-f", "qcow2", base, "64M")
		qemuImg("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", p)
	case "text":
		os.WriteFile(p, []byte(strings.Repeat("not an image\n", 100)), 0o644)
	}
	return p
}

func importImage(t *testing.T, srv http.Handler, name, file string) (int, []byte) {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	req := httptest.NewRequest("PUT", "/v1/images/"+name, f)
	rec := httptest.NewRecorder()
	srv.ServeHTTP(rec, req)
	return rec.Code, rec.Body.Bytes()
}

// TestImagesThroughTheAPI: images go in checked, are listed with the VMs
// made from them, give VMs their disks, and cannot go while used.
func TestImagesThroughTheAPI(t *testing.T) {
	m, h := newTestManager(t)
	srv := authed(t, m, RoleOperator)
	for name, kind := range map[string]string{"debian": "qcow2", "rawdisk": "raw", "installer": "iso"} {
		if code, b := importImage(t, srv, name, testImage(t, kind)); code != http.StatusCreated {
			t.Fatalf("import %s: %d %s", name, code, b)
		}
	}
	for _, tt := range []struct{ name, kind, want string }{
		{"backed", "backed", "backing file"},
		{"text", "text", "not"},
		{"debian", "qcow2", "exists"},
		{"Bad_Name", "qcow2", "DNS label"},
	} {
		code, b := importImage(t, srv, tt.name, testImage(t, tt.kind))
		if code < 400 || code >= 500 || !strings.Contains(string(b), tt.want) {
			t.Errorf("import %s (%s): %d %s, want a 4xx saying %q", tt.name, tt.kind, code, b, tt.want)
		}
	}
	blobs, _ := m.images.List()
	if len(blobs) != 3 {
		t.Fatalf("%d blobs in the store after 3 good and 4 refused imports, want 3", len(blobs))
	}

	ctx := context.Background()
	vm, err := m.Create(ctx, api.VMCreateRequest{Name: "web1", MemoryBytes: 512 << 20, CPUs: 1, Image: "debian", UserData: "#cloud-config\nruncmd: [touch, /x]\n"})
	if err != nil {
		t.Fatalf("create from an image: %v", err)
	}
	if vm.Image != "debian" || vm.DiskBytes != 64<<20 {
		t.Fatalf("vm from an image: image %q disk %d, want debian and the image's 64 MiB", vm.Image, vm.DiskBytes)
	}
	r, _, err := m.load(ctx, "web1")
	if err != nil || r.Spec.Image == nil || r.Spec.CloudInit == nil || r.Spec.CloudInit.InstanceID != r.Spec.UUID || !strings.Contains(r.Spec.CloudInit.UserData, "runcmd") {
		t.Fatalf("spec of a vm from an image: %+v, %v", r.Spec, err)
	}
	for _, tt := range []struct {
		req  api.VMCreateRequest
		want string
	}{
		{api.VMCreateRequest{Name: "a", MemoryBytes: 512 << 20, CPUs: 1, Image: "nope"}, "no image named nope"},
		{api.VMCreateRequest{Name: "a", MemoryBytes: 512 << 20, CPUs: 1, Image: "debian", DiskBytes: 32 << 20}, "smaller than image"},
		{api.VMCreateRequest{Name: "a", MemoryBytes: 512 << 20, CPUs: 1, Image: "installer"}, "is an ISO"},
		{api.VMCreateRequest{Name: "a", MemoryBytes: 512 << 20, CPUs: 1, ISO: "debian", DiskBytes: 1 << 30}, "not an ISO"},
		{api.VMCreateRequest{Name: "a", MemoryBytes: 512 << 20, CPUs: 1, Image: "debian", UserData: "just text"}, "user-data"},
		{api.VMCreateRequest{Name: "a", MemoryBytes: 512 << 20, CPUs: 1, Image: "debian", SSHKeys: []string{"ssh-rsa AAAA"}}, "ssh"},
		{api.VMCreateRequest{Name: "a", MemoryBytes: 512 << 20, CPUs: 1, Image: "debian", Firmware: "coreboot"}, "firmware"},
		{api.VMCreateRequest{Name: "a", MemoryBytes: 512 << 20, CPUs: 1, Image: "debian", ISO: "installer"}, "not both"},
		{api.VMCreateRequest{Name: "a", MemoryBytes: 512 << 20, CPUs: 1, DiskBytes: 1 << 30, UserData: "#cloud-config\n"}, "image"},
	} {
		if _, err := m.Create(ctx, tt.req); !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrNotFound) || err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("create %+v: %v, want an error saying %q", tt.req, err, tt.want)
		}
	}
	if h.exists("a") {
		t.Fatal("a refused create reached the host")
	}
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "inst", MemoryBytes: 512 << 20, CPUs: 1, ISO: "installer", DiskBytes: 1 << 30, Firmware: "uefi"}); err != nil {
		t.Fatalf("create from an iso: %v", err)
	}

	code, b := call(t, srv, "GET", "/v1/images", "")
	var imgs []api.Image
	if err := json.Unmarshal(b, &imgs); code != 200 || err != nil || len(imgs) != 3 {
		t.Fatalf("list: %d %s", code, b)
	}
	users := map[string]string{}
	for _, im := range imgs {
		users[im.Name] = strings.Join(im.VMs, ",")
		if !strings.HasPrefix(im.Digest, "sha256:") || im.FileSize <= 0 || im.VirtualSize <= 0 {
			t.Errorf("image %+v lacks its digest or sizes", im)
		}
	}
	if users["debian"] != "web1" || users["installer"] != "inst" || users["rawdisk"] != "" {
		t.Fatalf("image users %v", users)
	}
	if code, b := call(t, srv, "DELETE", "/v1/images/debian", ""); code != http.StatusConflict || !strings.Contains(string(b), "web1") {
		t.Fatalf("delete a used image: %d %s, want 409 naming web1", code, b)
	}
	if err := m.Delete(ctx, "web1", false); err != nil {
		t.Fatal(err)
	}
	if code, b := call(t, srv, "DELETE", "/v1/images/debian", ""); code != http.StatusNoContent {
		t.Fatalf("delete an unused image: %d %s", code, b)
	}
	if code, _ := call(t, srv, "DELETE", "/v1/images/debian", ""); code != http.StatusNotFound {
		t.Fatalf("delete it again: %d, want 404", code)
	}
	if code, _ := importImage(t, authed(t, m, RoleViewer), "other", testImage(t, "qcow2")); code != http.StatusForbidden {
		t.Fatalf("a viewer imported an image: %d", code)
	}
}

// TestReconfigureScreenshotAndVNC: user-data changes under a new instance
// id, an ISO is ejected, and the screen is reached through the API only.
func TestReconfigureScreenshotAndVNC(t *testing.T) {
	m, h := newTestManager(t)
	srv := authed(t, m, RoleOperator)
	ctx := context.Background()
	for name, kind := range map[string]string{"debian": "qcow2", "installer": "iso"} {
		if code, b := importImage(t, srv, name, testImage(t, kind)); code != http.StatusCreated {
			t.Fatalf("import %s: %d %s", name, code, b)
		}
	}
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "web1", MemoryBytes: 512 << 20, CPUs: 1, Image: "debian", Start: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create(ctx, api.VMCreateRequest{Name: "inst", MemoryBytes: 512 << 20, CPUs: 1, ISO: "installer", DiskBytes: 1 << 30}); err != nil {
		t.Fatal(err)
	}
	before, _, _ := m.load(ctx, "web1")
	code, b := call(t, srv, "PATCH", "/v1/vms/web1", `{"user_data":"#cloud-config\nhostname: x\n"}`)
	if code != 200 {
		t.Fatalf("new user-data: %d %s", code, b)
	}
	after, _, _ := m.load(ctx, "web1")
	if after.Spec.CloudInit.InstanceID == before.Spec.CloudInit.InstanceID || !strings.Contains(after.Spec.CloudInit.UserData, "hostname: x") {
		t.Fatalf("cloud-init after new user-data: %+v (before %+v)", after.Spec.CloudInit, before.Spec.CloudInit)
	}
	if !strings.Contains(h.callsString(), "configure web1/cloud-init") {
		t.Fatalf("the host was not told: %s", h.callsString())
	}
	for _, tt := range []struct{ vm, body, want string }{
		{"web1", `{"eject":true}`, "no cd-rom"},
		{"inst", `{"user_data":"#cloud-config\n"}`, "not configured by cloud-init"},
		{"web1", `{}`, "nothing to change"},
		{"web1", `{"user_data":"no header"}`, "user-data"},
	} {
		if code, b := call(t, srv, "PATCH", "/v1/vms/"+tt.vm, tt.body); code != 400 || !strings.Contains(string(b), tt.want) {
			t.Errorf("patch %s %s: %d %s, want 400 saying %q", tt.vm, tt.body, code, b, tt.want)
		}
	}
	if code, b := call(t, srv, "PATCH", "/v1/vms/inst", `{"eject":true}`); code != 200 {
		t.Fatalf("eject: %d %s", code, b)
	}
	if r, _, _ := m.load(ctx, "inst"); !r.Spec.Ejected {
		t.Fatal("eject not recorded")
	}

	if code, b := call(t, srv, "GET", "/v1/vms/web1/screenshot", ""); code != 200 || string(b) != string(fakePNG) {
		t.Fatalf("screenshot: %d %q", code, b)
	}
	if code, _ := call(t, srv, "GET", "/v1/vms/inst/screenshot", ""); code != http.StatusConflict {
		t.Fatalf("screenshot of a stopped vm: %d, want 409", code)
	}

	// VNC: the connection is upgraded and bytes go both ways.
	ts := httptest.NewServer(srv)
	defer ts.Close()
	if resp, err := http.Get(ts.URL + "/v1/vms/web1/vnc"); err != nil || resp.StatusCode != 400 {
		t.Fatalf("vnc without upgrade: %v %v", resp, err)
	}
	req, _ := http.NewRequest("GET", ts.URL+"/v1/vms/web1/vnc", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", hostproto.TunnelProtocol)
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("vnc: %v %v", resp, err)
	}
	conn := resp.Body.(io.ReadWriteCloser)
	if _, err := io.WriteString(conn, "RFB 003.008\n"); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || line != "RFB 003.008\n" {
		t.Fatalf("through the tunnel: %q %v", line, err)
	}
	conn.Close()
	// The audit log is written behind the requests.
	var entries []api.AuditEntry
	found := false
	for deadline := time.Now().Add(5 * time.Second); !found && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if entries, err = m.Audit(ctx, 100); err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			found = found || e.Action == "GET /v1/vms/web1/vnc" && e.Status == http.StatusSwitchingProtocols
		}
	}
	if !found {
		t.Fatalf("the vnc session was not audited: %+v", entries)
	}
}

// TestUnnamedBlobsGo: a manager drops the blobs no image record names once
// they are past the grace an import needs, but not one a VM was made from
// (its image deleted meanwhile), nor a young one.
func TestUnnamedBlobsGo(t *testing.T) {
	m, _ := newTestManager(t)
	add := func(content string) string {
		t.Helper()
		sum := sha256.Sum256([]byte(content))
		d := "sha256:" + hex.EncodeToString(sum[:])
		if err := m.images.Add(strings.NewReader(content), d, 1<<20); err != nil {
			t.Fatal(err)
		}
		return d
	}
	age := func(d string, by time.Duration) {
		t.Helper()
		then := time.Now().Add(-by)
		if err := os.Chtimes(m.images.Path(d), then, then); err != nil {
			t.Fatal(err)
		}
	}
	used, unused, young := add("used"), add("unused"), add("young")
	putRecord(t, m, record{Host: "h1", State: api.StateStopped,
		Spec: hostproto.VMSpec{Name: "v", Image: &hostproto.ImageRef{Name: "gone", Digest: used, Format: "qcow2"}}})
	// Aged only once the record is stored: the manager's own sync runs
	// from its start, and must not find "used" old and unnamed before.
	age(used, 2*blobGrace)
	age(unused, 2*blobGrace)
	age(young, time.Minute)
	m.syncImagesOnce(context.Background())
	switch {
	case m.images.Has(unused):
		t.Fatal("a blob no record names, past its grace, was kept")
	case !m.images.Has(used):
		t.Fatal("the blob a vm was made from was dropped")
	case !m.images.Has(young):
		t.Fatal("a young blob (an import not yet recorded) was dropped")
	}
}
