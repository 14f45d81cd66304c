package store

import (
	"bufio"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// listeningTCPPorts lists the ports of this process's listening TCP
// sockets (IPv4 and IPv6). Other processes' do not count: go test runs
// packages side by side, and theirs come and go.
func listeningTCPPorts(t *testing.T) map[int]bool {
	t.Helper()
	ours := map[string]bool{} // socket inodes held by this process
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		if l, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); err == nil {
			if ino, ok := strings.CutPrefix(l, "socket:["); ok {
				ours[strings.TrimSuffix(ino, "]")] = true
			}
		}
	}
	ports := map[int]bool{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		fh, err := os.Open(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 10 || fields[3] != "0A" || !ours[fields[9]] { // 0A: LISTEN; 9: inode
				continue
			}
			i := strings.LastIndexByte(fields[1], ':')
			if p, err := strconv.ParseInt(fields[1][i+1:], 16, 32); err == nil {
				ports[int(p)] = true
			}
		}
		fh.Close()
	}
	return ports
}

// The embedded etcd's client API is a unix socket in its 0700 data dir,
// never a TCP port: its only TCP listener is the peer port.
func TestEmbeddedClientOnlyOnASocket(t *testing.T) {
	before := listeningTCPPorts(t)
	dir := filepath.Join(t.TempDir(), "etcd")
	e, err := StartEmbedded(context.Background(), dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	u, err := loadPeerURL(filepath.Join(dir, "urls.json"))
	if err != nil {
		t.Fatal(err)
	}
	peer, err := strconv.Atoi(u.Peer[strings.LastIndexByte(u.Peer, ':')+1:])
	if err != nil {
		t.Fatalf("peer url %q: %v", u.Peer, err)
	}
	after := listeningTCPPorts(t)
	if !after[peer] {
		t.Fatalf("the peer port %d is not among this process's listeners %v: the check would see nothing", peer, after)
	}
	for p := range after {
		if !before[p] && p != peer {
			t.Errorf("a new TCP listener on port %d besides the peer port %d", p, peer)
		}
	}
	st, err := os.Stat(dir)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("etcd dir mode %v (%v), want 0700", st.Mode().Perm(), err)
	}
	sock := filepath.Join(dir, "client.sock")
	if st, err := os.Stat(sock); err != nil || st.Mode()&os.ModeSocket == 0 {
		t.Fatalf("%s is not a socket: %v", sock, err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"unix://" + sock}, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "k", "v"); err != nil {
		t.Fatalf("put over the socket: %v", err)
	}
	if r, err := e.Client().Get(ctx, "k"); err != nil || len(r.Kvs) != 1 {
		t.Fatalf("the in-process client does not see the put: %v", err)
	}
}

func TestClientSocketPathTooLong(t *testing.T) {
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 100))
	if _, err := StartEmbedded(context.Background(), dir, nil); err == nil || !strings.Contains(err.Error(), "shorter data directory") {
		t.Fatalf("a data dir too long for a socket: %v", err)
	}
}
