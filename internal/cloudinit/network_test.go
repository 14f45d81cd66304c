package cloudinit

import (
	"net/netip"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

func TestNetworkConfig(t *testing.T) {
	b, err := NetworkConfig([]Interface{
		{MAC: "52:54:00:00:00:0a", Address: netip.MustParsePrefix("10.80.0.10/24"), Gateway: netip.MustParseAddr("10.80.0.1"),
			DNS: []netip.Addr{netip.MustParseAddr("10.80.0.1")}},
		{MAC: "52:54:00:00:00:0b"},
	})
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Version   int `json:"version"`
		Ethernets map[string]struct {
			Match       map[string]string `json:"match"`
			SetName     string            `json:"set-name"`
			DHCP4       bool              `json:"dhcp4"`
			Addresses   []string          `json:"addresses"`
			Gateway4    string            `json:"gateway4"`
			Nameservers struct {
				Addresses []string `json:"addresses"`
			} `json:"nameservers"`
		} `json:"ethernets"`
	}
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatalf("%v\n%s", err, b)
	}
	e0, e1 := doc.Ethernets["eth0"], doc.Ethernets["eth1"]
	if doc.Version != 2 || e0.Match["macaddress"] != "52:54:00:00:00:0a" || e0.SetName != "eth0" || e0.DHCP4 ||
		strings.Join(e0.Addresses, ",") != "10.80.0.10/24" || e0.Gateway4 != "10.80.0.1" ||
		strings.Join(e0.Nameservers.Addresses, ",") != "10.80.0.1" {
		t.Fatalf("eth0:\n%s", b)
	}
	if !e1.DHCP4 || e1.Match["macaddress"] != "52:54:00:00:00:0b" || e1.Gateway4 != "" {
		t.Fatalf("eth1:\n%s", b)
	}
}
