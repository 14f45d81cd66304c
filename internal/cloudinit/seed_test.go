package cloudinit

import (
	"bytes"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/vigil-project/vigil/internal/iso9660/isotest"
	"sigs.k8s.io/yaml"
)

const netV2 = "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"

// readSeed reads a seed image back and returns its files by name.
func readSeed(t *testing.T, img []byte) map[string][]byte {
	t.Helper()
	v, err := isotest.Read(img)
	if err != nil {
		t.Fatalf("read seed: %v", err)
	}
	if v.VolumeID != "cidata" {
		t.Fatalf("volume id %q, want cidata", v.VolumeID)
	}
	files := map[string][]byte{}
	for _, f := range v.Files {
		files[f.Name] = f.Data
	}
	return files
}

func TestSeed(t *testing.T) {
	tests := []struct {
		name          string
		meta          Meta
		userData      []byte
		networkConfig []byte
		wantMeta      map[string]any
		wantUserData  string
	}{
		{
			name:         "defaults",
			meta:         Meta{InstanceID: "i-0123", Hostname: "vm1"},
			wantMeta:     map[string]any{"instance-id": "i-0123", "local-hostname": "vm1"},
			wantUserData: "#cloud-config\n",
		},
		{
			name:         "no hostname",
			meta:         Meta{InstanceID: "i-0123"},
			wantMeta:     map[string]any{"instance-id": "i-0123"},
			wantUserData: "#cloud-config\n",
		},
		{
			name:          "user data and network config",
			meta:          Meta{InstanceID: "vm1-gen2", Hostname: "vm1.example.com"},
			userData:      []byte("#!/bin/sh\necho hi\n"),
			networkConfig: []byte(netV2),
			wantMeta:      map[string]any{"instance-id": "vm1-gen2", "local-hostname": "vm1.example.com"},
			wantUserData:  "#!/bin/sh\necho hi\n",
		},
		{
			// Unquoted, YAML 1.1 would read these as a bool and a number.
			name:         "values YAML would retype",
			meta:         Meta{InstanceID: "yes", Hostname: "1e3"},
			wantMeta:     map[string]any{"instance-id": "yes", "local-hostname": "1e3"},
			wantUserData: "#cloud-config\n",
		},
		{
			name:         "instance id with YAML syntax",
			meta:         Meta{InstanceID: `a: "b" # c 'd' \ é`},
			wantMeta:     map[string]any{"instance-id": `a: "b" # c 'd' \ é`},
			wantUserData: "#cloud-config\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img, err := Seed(tt.meta, tt.userData, tt.networkConfig)
			if err != nil {
				t.Fatalf("Seed: %v", err)
			}
			files := readSeed(t, img)
			wantNames := []string{"meta-data", "user-data"}
			if tt.networkConfig != nil {
				wantNames = append(wantNames, "network-config")
			}
			var names []string
			for n := range files {
				names = append(names, n)
			}
			slices.Sort(names)
			slices.Sort(wantNames)
			if !slices.Equal(names, wantNames) {
				t.Fatalf("files %q, want %q", names, wantNames)
			}
			var meta map[string]any
			if err := yaml.UnmarshalStrict(files["meta-data"], &meta); err != nil {
				t.Fatalf("meta-data does not parse: %v\n%s", err, files["meta-data"])
			}
			if len(meta) != len(tt.wantMeta) {
				t.Fatalf("meta-data %v, want %v", meta, tt.wantMeta)
			}
			for k, v := range tt.wantMeta {
				if meta[k] != v {
					t.Fatalf("meta-data %s = %#v, want %#v\n%s", k, meta[k], v, files["meta-data"])
				}
			}
			if got := string(files["user-data"]); got != tt.wantUserData {
				t.Fatalf("user-data %q, want %q", got, tt.wantUserData)
			}
			if !bytes.Equal(files["network-config"], tt.networkConfig) {
				t.Fatalf("network-config %q, want %q", files["network-config"], tt.networkConfig)
			}
		})
	}
}

func TestSeedRefuses(t *testing.T) {
	ok := Meta{InstanceID: "i-1", Hostname: "vm1"}
	tests := []struct {
		name          string
		meta          Meta
		userData      []byte
		networkConfig []byte
		want          error
	}{
		{"no instance id", Meta{Hostname: "vm1"}, nil, nil, ErrInvalidMeta},
		{"instance id with newline", Meta{InstanceID: "a\nb"}, nil, nil, ErrInvalidMeta},
		{"instance id too long", Meta{InstanceID: strings.Repeat("i", 256)}, nil, nil, ErrInvalidMeta},
		{"instance id not UTF-8", Meta{InstanceID: "i\xff"}, nil, nil, ErrInvalidMeta},
		{"hostname with underscore", Meta{InstanceID: "i", Hostname: "my_vm"}, nil, nil, ErrInvalidMeta},
		{"hostname with leading dash", Meta{InstanceID: "i", Hostname: "-vm"}, nil, nil, ErrInvalidMeta},
		{"hostname with trailing dot", Meta{InstanceID: "i", Hostname: "vm.example."}, nil, nil, ErrInvalidMeta},
		{"hostname label too long", Meta{InstanceID: "i", Hostname: strings.Repeat("a", 64)}, nil, nil, ErrInvalidMeta},
		{"hostname too long", Meta{InstanceID: "i", Hostname: strings.Repeat("a.", 127) + "a"}, nil, nil, ErrInvalidMeta},
		{"user data without header", ok, []byte("hostname: a\n"), nil, ErrInvalidUserData},
		{"network config not YAML", ok, nil, []byte("version: [2\n"), ErrInvalidNetworkConfig},
		{"network config without version", ok, nil, []byte("ethernets: {}\n"), ErrInvalidNetworkConfig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img, err := Seed(tt.meta, tt.userData, tt.networkConfig)
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if img != nil {
				t.Fatal("returned an image with the error")
			}
		})
	}
}

func TestSeedIsDeterministic(t *testing.T) {
	meta := Meta{InstanceID: "i-1", Hostname: "vm1"}
	a, err := Seed(meta, []byte("#cloud-config\n"), []byte(netV2))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Seed(meta, []byte("#cloud-config\n"), []byte(netV2))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a, b) {
		t.Fatal("same arguments gave different images")
	}
}

// TestSeedExternalTools has blkid, isoinfo and xorriso (when installed)
// confirm that the seed is what cloud-init looks for: an iso9660
// filesystem labelled cidata with the three files under their real names.
func TestSeedExternalTools(t *testing.T) {
	userData, err := UserDataForSSHKeys([]string{keyEd25519})
	if err != nil {
		t.Fatal(err)
	}
	img, err := Seed(Meta{InstanceID: "i-1", Hostname: "vm1"}, userData, []byte(netV2))
	if err != nil {
		t.Fatal(err)
	}
	isotest.CheckWithTools(t, img, "cidata", readSeed(t, img))
}

func TestValidateNetworkConfig(t *testing.T) {
	tests := []struct {
		name string
		in   string
		ok   bool
	}{
		{"version 2", netV2, true},
		{"version 1", "version: 1\nconfig:\n  - type: physical\n    name: eth0\n", true},
		{"under network", "network:\n  version: 2\n  ethernets: {}\n", true},
		{"version 3", "version: 3\n", false},
		{"version as string", "version: \"2\"\n", false},
		{"list", "- version: 2\n", false},
		{"empty", "\n", false},
		{"bad YAML", "version: [2\n", false},
		{"too large", "version: 2\n#" + strings.Repeat("x", MaxNetworkConfigSize), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateNetworkConfig([]byte(tt.in))
			if tt.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tt.ok && !errors.Is(err, ErrInvalidNetworkConfig) {
				t.Fatalf("got %v, want ErrInvalidNetworkConfig", err)
			}
		})
	}
}
