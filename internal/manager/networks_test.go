package manager

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
)

func TestNetworksThroughTheAPI(t *testing.T) {
	m, h := newTestManager(t)
	srv := authed(t, m, RoleAdmin)
	mustCall := func(method, path, body string, want int) []byte {
		t.Helper()
		code, b := call(t, srv, method, path, body)
		if code != want {
			t.Fatalf("%s %s %s: %d %s (want %d)", method, path, body, code, b, want)
		}
		return b
	}
	var blue api.Network
	if err := json.Unmarshal(mustCall("POST", "/v1/networks", `{"name":"blue","subnet":"10.80.0.0/29","nat":true}`, 201), &blue); err != nil {
		t.Fatal(err)
	}
	if blue.Mode != "managed" || blue.Gateway != "10.80.0.1" || blue.VNI < firstVNI || blue.Free != 5 {
		t.Fatalf("network: %+v", blue)
	}
	mustCall("POST", "/v1/networks", `{"name":"lan","bridge":"br0"}`, 201)

	bad := []struct{ name, path, body, code, msg string }{
		{"overlap", "/v1/networks", `{"name":"red","subnet":"10.80.0.0/16"}`, "conflict", "overlaps network blue"},
		{"duplicate", "/v1/networks", `{"name":"blue","subnet":"10.90.0.0/24"}`, "conflict", "already exists"},
		{"both", "/v1/networks", `{"name":"x","subnet":"10.90.0.0/24","bridge":"br1"}`, "invalid", "not both"},
		{"neither", "/v1/networks", `{"name":"x"}`, "invalid", "needs --subnet"},
		{"public", "/v1/networks", `{"name":"x","subnet":"8.8.8.0/24"}`, "invalid", "private range"},
		{"host bits", "/v1/networks", `{"name":"x","subnet":"10.90.0.1/24"}`, "invalid", "did you mean"},
		{"gateway outside", "/v1/networks", `{"name":"x","subnet":"10.90.0.0/24","gateway":"10.91.0.1"}`, "invalid", "not a host address"},
		{"bad bridge", "/v1/networks", `{"name":"x","bridge":"br0; rm -rf"}`, "invalid", "not an interface name"},
		{"same bridge", "/v1/networks", `{"name":"x","bridge":"br0"}`, "conflict", "already network lan"},
		{"nat on bridge", "/v1/networks", `{"name":"x","bridge":"br9","nat":true}`, "invalid", "managed networks"},
		{"reserved name", "/v1/networks", `{"name":"user","subnet":"10.90.0.0/24"}`, "invalid", "user-mode"},
		{"ip outside", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456,"nics":[{"network":"blue","ip":"10.81.0.5"}]}`, "invalid", "outside"},
		{"ip is gateway", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456,"nics":[{"network":"blue","ip":"10.80.0.1"}]}`, "invalid", "gateway"},
		{"no such network", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456,"nics":[{"network":"green"}]}`, "not_found", "network green does not exist"},
		{"bad mac", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456,"nics":[{"network":"blue","mac":"01:00:5e:00:00:01"}]}`, "invalid", "multicast"},
		{"user plus", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456,"nics":[{"network":"user"},{"network":"blue"}]}`, "invalid", "cannot be combined"},
		{"publish on user", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456,"publish":[{"host_port":8080,"guest_port":80}]}`, "invalid", "needs the VM on a network"},
		{"publish low port", "/v1/vms", `{"name":"a","memory_bytes":134217728,"cpus":1,"disk_bytes":268435456,"nics":[{"network":"blue"}],"publish":[{"host_port":22,"guest_port":22}]}`, "invalid", "1024-65535"},
	}
	for _, tc := range bad {
		code, b := call(t, srv, "POST", tc.path, tc.body)
		var e api.Error
		_ = json.Unmarshal(b, &e)
		if code < 400 || e.Code != tc.code || !strings.Contains(e.Error, tc.msg) {
			t.Errorf("%s: %d %s, want %s saying %q", tc.name, code, b, tc.code, tc.msg)
		}
	}
	if h.exists("a") {
		t.Fatal("a refused create reached the host")
	}

	create := func(name, nics, publish string) (api.VM, int, []byte) {
		body := fmt.Sprintf(`{"name":%q,"memory_bytes":134217728,"cpus":1,"disk_bytes":268435456,"nics":%s,"publish":%s}`, name, nics, publish)
		code, b := call(t, srv, "POST", "/v1/vms", body)
		var vm api.VM
		_ = json.Unmarshal(b, &vm)
		return vm, code, b
	}
	web, code, b := create("web", `[{"network":"blue"}]`, `[{"host_port":8080,"guest_port":80}]`)
	if code != 201 || len(web.NICs) != 1 || web.NICs[0].IP != "10.80.0.2" || web.Endpoint != "10.80.0.2:80" || len(web.Publish) != 1 {
		t.Fatalf("create web: %d %s", code, b)
	}
	db, code, b := create("db", `[{"network":"blue","ip":"10.80.0.6","mac":"52:54:00:aa:bb:cc"},{"network":"lan"}]`, `[]`)
	if code != 201 || db.NICs[0].IP != "10.80.0.6" || db.NICs[0].MAC != "52:54:00:aa:bb:cc" || db.NICs[1].IP != "" {
		t.Fatalf("create db: %d %s", code, b)
	}
	for _, tc := range []struct{ name, nics, publish, msg string }{
		{"taken ip", `[{"network":"blue","ip":"10.80.0.6"}]`, `[]`, "already held by db"},
		{"taken mac", `[{"network":"blue","mac":"52:54:00:aa:bb:cc"}]`, `[]`, "already vm db's"},
		{"taken port", `[{"network":"blue"}]`, `[{"host_port":8080,"guest_port":80}]`, "already published by vm web"},
	} {
		if _, code, b := create("x", tc.nics, tc.publish); code != 409 || !strings.Contains(string(b), tc.msg) {
			t.Errorf("%s: %d %s", tc.name, code, b)
		}
	}
	// Racing creates on the last addresses: every address held once.
	var wg sync.WaitGroup
	ips := make(chan string, 6)
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if vm, code, _ := create(fmt.Sprintf("r%d", i), `[{"network":"blue"}]`, `[]`); code == 201 {
				ips <- vm.NICs[0].IP
			}
		}(i)
	}
	wg.Wait()
	close(ips)
	seen := map[string]bool{"10.80.0.2": true, "10.80.0.6": true}
	n := 0
	for ip := range ips {
		if seen[ip] {
			t.Fatalf("address %s handed out twice", ip)
		}
		seen[ip] = true
		n++
	}
	if n != 3 { // .3 .4 .5 were left
		t.Fatalf("%d racing creates got an address, want 3", n)
	}
	if _, code, b := create("full", `[{"network":"blue"}]`, `[]`); code != 409 || !strings.Contains(string(b), "no free address") {
		t.Fatalf("create on a full network: %d %s", code, b)
	}

	// The leader tells each host the networks its VMs use.
	waitMirror(t, m)
	m.pushNetworks(context.Background())
	h.mu.Lock()
	pushed := append([]hostproto.NetworkSpec(nil), h.networks...)
	h.mu.Unlock()
	if len(pushed) != 2 || pushed[0].Name != "blue" || pushed[0].Subnet != "10.80.0.0/29" || pushed[0].VNI != blue.VNI || pushed[1].Name != "lan" || pushed[1].Bridge != "br0" {
		t.Fatalf("networks pushed to the host: %+v", pushed)
	}

	if code, b := call(t, srv, "DELETE", "/v1/networks/blue", ""); code != 409 || !strings.Contains(string(b), "in use by") {
		t.Fatalf("delete a network in use: %d %s", code, b)
	}
	// Deleting a VM frees its address, MAC and port.
	mustCall("DELETE", "/v1/vms/db", "", 204)
	if vm, code, b := create("db2", `[{"network":"blue","ip":"10.80.0.6","mac":"52:54:00:aa:bb:cc"}]`, `[]`); code != 201 || vm.NICs[0].IP != "10.80.0.6" {
		t.Fatalf("the deleted VM's address was not freed: %d %s", code, b)
	}
	var nets []api.Network
	if err := json.Unmarshal(mustCall("GET", "/v1/networks", "", 200), &nets); err != nil || len(nets) != 2 || nets[0].Name != "blue" || nets[0].Free != 0 {
		t.Fatalf("network list: %+v %v", nets, err)
	}
	mustCall("DELETE", "/v1/networks/lan", "", 204)
	mustCall("GET", "/v1/networks/lan", "", 404)
}
