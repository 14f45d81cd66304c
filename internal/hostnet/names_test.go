package hostnet

import "testing"

func TestNames(t *testing.T) {
	seen := map[string]bool{}
	for _, n := range []string{
		BridgeName("default"), BridgeName("prod"), VXLANName("default"),
		TapName("h1", "web", 0), TapName("h1", "web", 1), TapName("h2", "web", 0), TapName("h1", "web", 10),
	} {
		if len(n) > 15 {
			t.Errorf("%q is longer than IFNAMSIZ-1", n)
		}
		if seen[n] {
			t.Errorf("%q made twice", n)
		}
		seen[n] = true
	}
	if BridgeName("default") != BridgeName("default") {
		t.Error("bridge names are not stable")
	}
	m := GatewayMAC("default")
	if m[0]&1 != 0 || m[0]&2 == 0 || m.String() != GatewayMAC("default").String() {
		t.Errorf("gateway MAC %s is not stable, unicast and locally administered", m)
	}
}
