package debkernel

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// unpackedKernel is a kernel package unpacked by an earlier build (make
// image), if there is one in the repository's build cache.
func unpackedKernel(t *testing.T) string {
	t.Helper()
	debs, _ := filepath.Glob("../../build/cache/linux-image-*.deb")
	if len(debs) == 0 {
		t.Skip("no kernel package in build/cache (make image fetches one)")
	}
	root := t.TempDir()
	if err := extractDeb(t.Context(), debs[len(debs)-1], root); err != nil {
		t.Fatal(err)
	}
	dirs, _ := filepath.Glob(filepath.Join(root, "lib", "modules", "*"))
	if len(dirs) != 1 {
		t.Fatalf("modules dirs %v", dirs)
	}
	return dirs[0]
}

func TestModulesComeAfterTheirDependencies(t *testing.T) {
	dir := unpackedKernel(t)
	order, err := resolveModules(dir, []string{"vxlan", "nft_nat", "bridge", "tun"})
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, p := range order {
		pos[modName(p)] = i
	}
	for _, m := range []string{"vxlan", "nft_nat", "bridge", "tun", "nf_tables", "nf_nat", "nf_conntrack", "udp_tunnel", "stp", "llc"} {
		if _, ok := pos[m]; !ok {
			t.Errorf("%s missing from %v", m, order)
		}
	}
	// Every module's dependencies come before it.
	for i, p := range order {
		deps, err := moduleDepends(filepath.Join(dir, p))
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range deps {
			if j, ok := pos[modName(d)]; ok && j > i {
				t.Errorf("%s loads before its dependency %s", p, d)
			}
		}
	}
	if n := len(order); n != len(slices.Compact(slices.Sorted(slices.Values(order)))) {
		t.Errorf("a module listed twice in %v", order)
	}
}

func TestModulesNamesWhatIsMissing(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "kernel"), 0o755)
	os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte("kernel/net/packet/af_packet.ko\n"), 0o644)
	if order, err := resolveModules(dir, []string{"af-packet"}); err != nil || len(order) != 0 {
		t.Errorf("a built-in module: got %v, %v; want nothing to load", order, err)
	}
	if _, err := resolveModules(dir, []string{"nosuch"}); err == nil || !strings.Contains(err.Error(), "nosuch") {
		t.Errorf("a missing module: got %v", err)
	}
}
