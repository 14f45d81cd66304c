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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vigil-project/vigil/internal/atomicfile"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
)

// Embedded is a single-member etcd running inside this process.
type Embedded struct {
	etcd  *embed.Etcd
	cli   *clientv3.Client
	close sync.Once
	quiet *atomic.Bool // silences etcd's logs while it shuts down
}

// DefaultQuotaBytes is the backend size at which an embedded member raises
// the NOSPACE alarm and refuses writes. It is etcd's own default, set
// explicitly so that the figure Maintain works against is Vigil's choice,
// not an accident of the etcd version.
const DefaultQuotaBytes = 2 << 30

// DefaultKeepRevisions is how many revisions of history are kept by an
// embedded member's auto-compaction and by Maintain. Vigil needs little
// history: updates compare-and-swap on the current ModRevision, and a watch
// that fails re-scans and resumes from the scan's revision
// (manager/hosts.go), so only the moments between a scan and its watch must
// survive a compaction. 10000 revisions are 100s of heartbeats from 100
// hosts, and about 30 MiB of 3 KiB status records.
const DefaultKeepRevisions = 10000

// Limits bound an embedded member's history and database file.
type Limits struct {
	// QuotaBytes is the NOSPACE threshold; 0 means DefaultQuotaBytes.
	QuotaBytes int64
	// KeepRevisions is how much history auto-compaction keeps; 0 means
	// DefaultKeepRevisions and a negative value turns auto-compaction off
	// (for tests that need to fill the quota).
	KeepRevisions int64
}

// apply sets cfg's compaction and quota.
//
// Auto-compaction keeps a number of revisions, not a period: history here is
// written by heartbeats (every host rewrites hoststatus/<name> each
// second), so a time window holds more bytes the more hosts there are —
// 5 minutes of 1000 hosts is 300000 revisions, near 1 GiB — while a
// revision count bounds the bytes whatever the fleet size. etcd runs the
// revision compactor only every 5 minutes, so between runs history grows by
// 5 minutes of writes; Maintain compacts more often and defragments.
func (l Limits) apply(cfg *embed.Config) {
	cfg.QuotaBackendBytes = l.QuotaBytes
	if cfg.QuotaBackendBytes == 0 {
		cfg.QuotaBackendBytes = DefaultQuotaBytes
	}
	keep := l.KeepRevisions
	if keep == 0 {
		keep = DefaultKeepRevisions
	}
	if keep < 0 {
		cfg.AutoCompactionMode, cfg.AutoCompactionRetention = embed.CompactorModePeriodic, "0"
		return
	}
	cfg.AutoCompactionMode = embed.CompactorModeRevision
	cfg.AutoCompactionRetention = strconv.FormatInt(keep, 10)
}

// newEmbedded wraps a started member with its in-process client.
func newEmbedded(e *embed.Etcd, quiet *atomic.Bool) *Embedded {
	cli := v3client.New(e.Server)
	cli.Maintenance = localMaintenance{Maintenance: cli.Maintenance, defrag: e.Server.Defragment}
	return &Embedded{etcd: e, cli: cli, quiet: quiet}
}

// localMaintenance answers Defragment itself: etcd 3.7.3's v3client builds
// its maintenance server without a health notifier, and that server's
// Defragment dereferences it (a nil-pointer panic). Like every call of the
// in-process client, it acts on this member whatever the endpoint.
type localMaintenance struct {
	clientv3.Maintenance
	defrag func() error
}

func (m localMaintenance) Defragment(ctx context.Context, _ string) (*clientv3.DefragmentResponse, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := m.defrag(); err != nil {
		return nil, fmt.Errorf("defragment: %w", err)
	}
	return &clientv3.DefragmentResponse{}, nil
}

// urls are remembered in the data dir: a member's peer URL is part of its
// stored identity, so a restart must come back on the same addresses.
type urls struct {
	Client string `json:"client,omitempty"` // not kept: always the socket in the data dir
	Peer   string `json:"peer"`
}

// StartEmbedded starts (or restarts) an embedded etcd with its data under dir
// and the default Limits. Free loopback ports are chosen the first time and
// reused afterwards.
func StartEmbedded(ctx context.Context, dir string, log *slog.Logger) (*Embedded, error) {
	return StartEmbeddedWithLimits(ctx, dir, Limits{}, log)
}

// StartEmbeddedWithLimits is StartEmbedded with a chosen quota and history.
func StartEmbeddedWithLimits(ctx context.Context, dir string, lim Limits, log *slog.Logger) (*Embedded, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create etcd dir: %w", err)
	}
	u, err := loadURLs(dir)
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
	quiet := new(atomic.Bool)
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(etcdLogger(log, quiet))
	lim.apply(cfg)

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
		quiet.Store(true)
		e.Close()
		return nil, ctx.Err()
	}
	log.Debug("embedded etcd ready", "dir", dir, "client", u.Client,
		"quota_bytes", cfg.QuotaBackendBytes, "compaction", cfg.AutoCompactionMode, "retention", cfg.AutoCompactionRetention)
	return newEmbedded(e, quiet), nil
}

// Store is a Store over this member. While the cluster has this one member
// (the embedded default), its reads skip etcd's round of consensus (they
// are "serializable"), which is still linearizable there: the member
// answers a write only after applying it, and no other member can commit
// one. Under a thousand small writes a second (a thousand hosts'
// heartbeats) that took a read's p99 from 1.2-3.1 ms to 0.2-0.3 ms and its
// worst from 62 ms to 3 ms. The membership is looked at on every read: once
// a second member is added, this one's copy may lag, and reads go through
// consensus again.
func (e *Embedded) Store(prefix string) *Store {
	st := New(e.cli, prefix)
	st.sole = func() bool { return len(e.etcd.Server.Cluster().Members()) == 1 }
	return st
}

// Client is an in-process client of the embedded member.
func (e *Embedded) Client() *clientv3.Client { return e.cli }

// Close stops the member after its client; again, it does nothing.
func (e *Embedded) Close() {
	e.close.Do(func() {
		e.quiet.Store(true) // etcd reports its routine shutdown as errors
		e.cli.Close()
		e.etcd.Close()
	})
}

// loadURLs returns the member's URLs kept in dir. Clients reach it on a
// unix socket in dir (mode 0700), never on a TCP port: the in-process
// client needs no listener at all, and whoever reaches etcd's client API
// controls the cluster, so only the agent's user may (the socket is there
// for tools such as etcdctl and the benchmarks).
func loadURLs(dir string) (urls, error) {
	u, err := loadPeerURL(filepath.Join(dir, "urls.json"))
	if err != nil {
		return u, err
	}
	abs, err := filepath.Abs(filepath.Join(dir, "client.sock"))
	if err != nil {
		return u, err
	}
	// sun_path holds 108 bytes with its terminating NUL.
	if len(abs) > 107 {
		return u, fmt.Errorf("etcd's client socket %s is %d bytes long, more than a unix socket takes (107): use a shorter data directory", abs, len(abs))
	}
	u.Client = "unix://" + abs
	return u, nil
}

func loadPeerURL(path string) (urls, error) {
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
	pp, err := freePort()
	if err != nil {
		return u, err
	}
	u = urls{Peer: fmt.Sprintf("http://127.0.0.1:%d", pp)}
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
	// Limits bound this member's history and database (zero: defaults).
	Limits Limits
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
	u, err := loadURLs(dir)
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
	quiet := new(atomic.Bool)
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(etcdLogger(log, quiet))
	cc.Limits.apply(cfg)
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
		quiet.Store(true)
		e.Close()
		return nil, ctx.Err()
	}
	log.Info("etcd member ready", "member", cc.Name, "cluster", cfg.InitialCluster,
		"quota_bytes", cfg.QuotaBackendBytes, "compaction", cfg.AutoCompactionMode, "retention", cfg.AutoCompactionRetention)
	return newEmbedded(e, quiet), nil
}
