package store

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/atomicfile"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
	"go.uber.org/zap"
)

// Embedded is a single-member etcd running inside this process.
type Embedded struct {
	etcd *embed.Etcd
	cli  *clientv3.Client
}

// urls are remembered in the data dir: a member's peer URL is part of its
// stored identity, so a restart must come back on the same addresses.
type urls struct {
	Client string `json:"client"`
	Peer   string `json:"peer"`
}

// StartEmbedded starts (or restarts) an embedded etcd with its data under dir.
// Free loopback ports are chosen the first time and reused afterwards.
func StartEmbedded(ctx context.Context, dir string, log *slog.Logger) (*Embedded, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create etcd dir: %w", err)
	}
	u, err := loadURLs(filepath.Join(dir, "urls.json"))
	if err != nil {
		return nil, err
	}
	cu, _ := url.Parse(u.Client)
	pu, _ := url.Parse(u.Peer)

	cfg := embed.NewConfig()
	cfg.Name = "vigil"
	cfg.Dir = filepath.Join(dir, "data")
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	// etcd's zap logs report routine shutdown as errors; Vigil logs what
	// matters about the store itself through slog.
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd in %s: %w", dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd: %w", err)
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("embedded etcd in %s was not ready after 60s", dir)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	log.Debug("embedded etcd ready", "dir", dir, "client", u.Client)
	return &Embedded{etcd: e, cli: v3client.New(e.Server)}, nil
}

// Client is an in-process client of the embedded member.
func (e *Embedded) Client() *clientv3.Client { return e.cli }

// Close stops the member after its client.
func (e *Embedded) Close() {
	e.cli.Close()
	e.etcd.Close()
}

func loadURLs(path string) (urls, error) {
	var u urls
	b, err := os.ReadFile(path)
	if err == nil {
		if err := json.Unmarshal(b, &u); err != nil {
			return u, fmt.Errorf("read %s: %w (delete it to pick new ports)", path, err)
		}
		return u, nil
	}
	if !os.IsNotExist(err) {
		return u, fmt.Errorf("read %s: %w", path, err)
	}
	cp, err := freePort()
	if err != nil {
		return u, err
	}
	pp, err := freePort()
	if err != nil {
		return u, err
	}
	u = urls{Client: fmt.Sprintf("http://127.0.0.1:%d", cp), Peer: fmt.Sprintf("http://127.0.0.1:%d", pp)}
	b, _ = json.Marshal(u)
	if err := atomicfile.WriteFile(path, b, 0o600); err != nil {
		return u, err
	}
	return u, nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// ClusterConfig makes an embedded etcd one member of a cluster of managers.
type ClusterConfig struct {
	// Name is this member's name; it must appear in Peers.
	Name string
	// Peers maps every member's name to its peer URL (http://host:port).
	Peers map[string]string
}

// StartEmbeddedMember starts this manager's member of an embedded etcd
// cluster. The call returns once the cluster has a quorum, so the members
// must be started together (in any order) the first time.
func StartEmbeddedMember(ctx context.Context, dir string, cc ClusterConfig, log *slog.Logger) (*Embedded, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	self, ok := cc.Peers[cc.Name]
	if !ok {
		return nil, fmt.Errorf("member %s is not in the etcd peers %v: add %s=http://HOST:PORT to --etcd-peers", cc.Name, cc.Peers, cc.Name)
	}
	pu, err := url.Parse(self)
	if err != nil {
		return nil, fmt.Errorf("peer url %q of %s: %w", self, cc.Name, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create etcd dir: %w", err)
	}
	u, err := loadURLs(filepath.Join(dir, "urls.json"))
	if err != nil {
		return nil, err
	}
	cu, _ := url.Parse(u.Client)
	cfg := embed.NewConfig()
	cfg.Name = cc.Name
	cfg.Dir = filepath.Join(dir, "data")
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	var parts []string
	for name, p := range cc.Peers {
		parts = append(parts, name+"="+p)
	}
	sort.Strings(parts)
	cfg.InitialCluster = strings.Join(parts, ",")
	cfg.InitialClusterToken = "vigil"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start etcd member %s in %s: %w", cc.Name, dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcd member %s: %w", cc.Name, err)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	}
	log.Info("etcd member ready", "member", cc.Name, "cluster", cfg.InitialCluster)
	return &Embedded{etcd: e, cli: v3client.New(e.Server)}, nil
}
