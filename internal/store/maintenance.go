package store

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Defaults of MaintainConfig.
const (
	// DefaultMaintainEvery is short next to the 2 GiB quota (a minute of
	// 100 heartbeats a second is ~18 MiB) and a pass is cheap: one Status
	// per member, one AlarmList and an incremental compaction.
	DefaultMaintainEvery = time.Minute
	// DefaultDefragEvery spaces routine defragmentations of a member, which
	// block its reads and writes while they copy the database.
	DefaultDefragEvery = 30 * time.Minute
	// DefaultDefragMinFree is the least reclaimable space worth a routine
	// defragmentation.
	DefaultDefragMinFree = 64 << 20
)

const (
	// A member whose database reaches riskNum/riskDen of its quota is
	// compacted to the current revision and defragmented at once: waiting
	// for the routine slot could let heartbeats hit NOSPACE, and hosts
	// fence themselves within seconds of failed heartbeats.
	riskNum, riskDen = 3, 4
	// callTimeout bounds Status and alarm calls; slowCallTimeout bounds a
	// compaction or defragmentation, which copy or delete the history.
	callTimeout     = 30 * time.Second
	slowCallTimeout = 5 * time.Minute
)

// MaintainConfig tunes Maintain; zero fields take the defaults.
type MaintainConfig struct {
	// Every is the time between passes (DefaultMaintainEvery).
	Every time.Duration
	// KeepRevisions is the history Maintain's compactions leave
	// (DefaultKeepRevisions).
	KeepRevisions int64
	// DefragEvery is the least time between two routine defragmentations
	// of one member (DefaultDefragEvery). A member near its quota or in
	// NOSPACE alarm is defragmented at once.
	DefragEvery time.Duration
	// DefragMinFree is the least reclaimable space (DbSize − DbSizeInUse)
	// for a routine defragmentation (DefaultDefragMinFree); it must also be
	// at least half the database.
	DefragMinFree int64
	// Endpoints are the members to inspect and defragment: by default the
	// client's endpoints or, for an in-process client (Embedded.Client),
	// the member it runs in.
	Endpoints []string
}

// MaintainStats are the figures of the latest maintenance pass, for
// metrics. Counters run from the Maintainer's start.
type MaintainStats struct {
	Passes    int
	LastPass  time.Time
	LastError string // of the latest pass; empty when it went through

	// Revision is the newest revision a member reported.
	Revision int64
	// CompactedTo is the revision Maintain last compacted history to, or
	// found already compacted past (by etcd's own compactor).
	CompactedTo    int64
	LastCompaction time.Time // of a compaction Maintain did itself

	Defrags    int
	LastDefrag time.Time
	// AlarmsCleared counts the NOSPACE alarms Maintain disarmed.
	AlarmsCleared int
	// NearQuota tells that the latest pass found a member in NOSPACE alarm
	// or with its database past 3/4 of its quota.
	NearQuota bool

	// DBSize, DBSizeInUse and Quota are those of the member nearest to its
	// quota; Members has them all.
	DBSize, DBSizeInUse, Quota int64
	Members                    []MemberStats
}

// MemberStats describe one etcd member's database.
type MemberStats struct {
	Endpoint string // as inspected; empty for the in-process member
	ID       uint64
	// DBSize is the space the database file has allocated (what the
	// quota is checked against); DBSizeInUse the part holding data.
	DBSize, DBSizeInUse, Quota int64
	LastDefrag                 time.Time
}

// Maintainer keeps etcd's history and database bounded: it compacts,
// defragments and clears NOSPACE alarms. Run it on every manager, not only
// the leader: under NOSPACE no leader can be elected (campaigning writes),
// and compacting twice is harmless.
type Maintainer struct {
	cli *clientv3.Client
	cfg MaintainConfig
	log *slog.Logger

	passMu     sync.Mutex           // one pass at a time
	lastDefrag map[uint64]time.Time // by member ID, under passMu

	mu    sync.Mutex
	stats MaintainStats
}

// NewMaintainer prepares maintenance of the cluster cli talks to.
func NewMaintainer(cli *clientv3.Client, cfg MaintainConfig, log *slog.Logger) *Maintainer {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Every <= 0 {
		cfg.Every = DefaultMaintainEvery
	}
	if cfg.KeepRevisions <= 0 {
		cfg.KeepRevisions = DefaultKeepRevisions
	}
	if cfg.DefragEvery <= 0 {
		cfg.DefragEvery = DefaultDefragEvery
	}
	if cfg.DefragMinFree <= 0 {
		cfg.DefragMinFree = DefaultDefragMinFree
	}
	if len(cfg.Endpoints) == 0 {
		cfg.Endpoints = cli.Endpoints()
	}
	if len(cfg.Endpoints) == 0 {
		cfg.Endpoints = []string{""}
	}
	return &Maintainer{cli: cli, cfg: cfg, log: log, lastDefrag: map[uint64]time.Time{}}
}

// Maintain runs maintenance passes until ctx ends, for callers that need
// no figures (see Maintainer.Stats).
func Maintain(ctx context.Context, cli *clientv3.Client, cfg MaintainConfig, log *slog.Logger) {
	NewMaintainer(cli, cfg, log).Run(ctx)
}

// Run passes at once and then every cfg.Every until ctx ends. A failed pass
// is logged and retried at the next one.
func (m *Maintainer) Run(ctx context.Context) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := m.Pass(ctx); err != nil && ctx.Err() == nil {
			m.log.Warn("etcd maintenance pass failed", "err", err)
		}
		// The jitter keeps the managers of an embedded cluster, each
		// defragmenting its own member, from doing it in step. Near the
		// quota, writes outpace the routine cadence: look again soon.
		next := m.cfg.Every + rand.N(m.cfg.Every/10+1)
		if m.Stats().NearQuota {
			next = m.cfg.Every / 10
		}
		t.Reset(next)
	}
}

// Stats returns the figures of the latest pass.
func (m *Maintainer) Stats() MaintainStats {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.stats
	s.Members = slices.Clone(s.Members)
	return s
}

// Pass does one round of maintenance: compact, defragment what needs it,
// and clear NOSPACE alarms once there is room again.
func (m *Maintainer) Pass(ctx context.Context) error {
	m.passMu.Lock()
	defer m.passMu.Unlock()
	s := m.Stats()
	err := m.pass(ctx, &s)
	s.Passes++
	s.LastPass, s.LastError = time.Now(), ""
	if err != nil {
		s.LastError = err.Error()
	}
	m.mu.Lock()
	m.stats = s
	m.mu.Unlock()
	return err
}

// member is one inspected etcd member.
type member struct {
	endpoint string
	st       *clientv3.StatusResponse
}

func (mb member) id() uint64     { return mb.st.Header.MemberId }
func (mb member) free() int64    { return mb.st.DbSize - mb.st.DbSizeInUse }
func (mb member) atRisk() bool   { return mb.st.DbSize*riskDen >= mb.st.DbSizeQuota*riskNum }
func (mb member) hasRoom() bool  { return mb.st.DbSize < mb.st.DbSizeQuota }
func (mb member) String() string { return fmt.Sprintf("%x", mb.id()) }

func (m *Maintainer) pass(ctx context.Context, s *MaintainStats) error {
	members, err := m.inspect(ctx, s)
	if err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, callTimeout)
	ar, err := m.cli.AlarmList(actx)
	cancel()
	if err != nil {
		return fmt.Errorf("list etcd alarms: %w", err)
	}
	nospace := map[uint64]bool{}
	for _, a := range ar.Alarms {
		switch a.Alarm {
		case pb.AlarmType_NOSPACE:
			nospace[a.MemberID] = true
		case pb.AlarmType_NONE:
		default:
			// Not Maintain's to clear: CORRUPT needs a person.
			m.log.Error("etcd alarm raised", "alarm", a.Alarm.String(), "member", fmt.Sprintf("%x", a.MemberID))
		}
	}

	// Near the quota, history goes entirely: a watcher that falls behind
	// re-scans, but a manager that cannot write fences every host.
	urgent := len(nospace) > 0 || slices.ContainsFunc(members, member.atRisk)
	s.NearQuota = urgent
	keep := m.cfg.KeepRevisions
	if urgent {
		keep = 0
		m.log.Warn("etcd database near or over its quota: compacting all history and defragmenting",
			"nospace_alarms", len(nospace), "db_size", s.DBSize, "quota", s.Quota)
	}
	if err := m.compact(ctx, s, s.Revision-keep, keep); err != nil {
		return err
	}
	// Compaction frees pages; look again before choosing what to defragment.
	if members, err = m.inspect(ctx, s); err != nil {
		return err
	}
	for _, mb := range members {
		if urgent && mb.st.DbSizeInUse*riskDen >= mb.st.DbSizeQuota*riskNum {
			m.log.Error("etcd data without history nearly fills the quota: raise it", "member", mb.String(),
				"in_use", mb.st.DbSizeInUse, "quota", mb.st.DbSizeQuota)
		}
	}
	if err := m.defragment(ctx, s, members, urgent, nospace); err != nil {
		return err
	}
	if len(nospace) == 0 {
		return nil
	}
	if members, err = m.inspect(ctx, s); err != nil {
		return err
	}
	return m.disarm(ctx, s, members, nospace)
}

// inspect asks every endpoint for its member's status and records the
// figures in s. Members that do not answer are skipped (and logged): the
// others still need maintenance.
func (m *Maintainer) inspect(ctx context.Context, s *MaintainStats) ([]member, error) {
	var members []member
	var errs []error
	seen := map[uint64]bool{}
	for _, ep := range m.cfg.Endpoints {
		sctx, cancel := context.WithTimeout(ctx, callTimeout)
		st, err := m.cli.Status(sctx, ep)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("status of etcd member at %q: %w", ep, err))
			continue
		}
		if st.DbSizeQuota <= 0 {
			// etcd before 3.5 does not report its quota; its default
			// is the same as Vigil's.
			st.DbSizeQuota = DefaultQuotaBytes
		}
		mb := member{endpoint: ep, st: st}
		if seen[mb.id()] {
			continue
		}
		seen[mb.id()] = true
		members = append(members, mb)
	}
	if len(members) == 0 {
		return nil, errors.Join(errs...)
	}
	for _, err := range errs {
		m.log.Warn("etcd member not inspected", "err", err)
	}
	s.Members = s.Members[:0]
	s.DBSize, s.DBSizeInUse, s.Quota = 0, 0, 0
	fullest := -1.0
	for _, mb := range members {
		s.Revision = max(s.Revision, mb.st.Header.Revision)
		s.Members = append(s.Members, MemberStats{Endpoint: mb.endpoint, ID: mb.id(),
			DBSize: mb.st.DbSize, DBSizeInUse: mb.st.DbSizeInUse, Quota: mb.st.DbSizeQuota, LastDefrag: m.lastDefrag[mb.id()]})
		if f := float64(mb.st.DbSize) / float64(max(mb.st.DbSizeQuota, 1)); f > fullest {
			fullest = f
			s.DBSize, s.DBSizeInUse, s.Quota = mb.st.DbSize, mb.st.DbSizeInUse, mb.st.DbSizeQuota
		}
	}
	return members, nil
}

// compact drops history before rev. etcd's own compactor (embedded
// members) may have got there first; that is not an error.
func (m *Maintainer) compact(ctx context.Context, s *MaintainStats, rev, keep int64) error {
	if rev <= 0 || rev <= s.CompactedTo {
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, slowCallTimeout)
	defer cancel()
	start := time.Now()
	// Physical: wait until the pages are free, so the defragmentation that
	// may follow can give them back.
	_, err := m.cli.Compact(cctx, rev, clientv3.WithCompactPhysical())
	switch {
	case errors.Is(err, rpctypes.ErrCompacted):
		s.CompactedTo = rev
		return nil
	case err != nil:
		return fmt.Errorf("compact etcd history to revision %d: %w", rev, err)
	}
	s.CompactedTo, s.LastCompaction = rev, time.Now()
	m.log.Debug("compacted etcd history", "revision", rev, "kept", keep, "took", time.Since(start))
	return nil
}

// defragment gives free pages back, one member at a time. Routinely that
// is at most one member a pass, the one with the most to reclaim and not
// defragmented lately; when urgent, every member with space to reclaim.
func (m *Maintainer) defragment(ctx context.Context, s *MaintainStats, members []member, urgent bool, nospace map[uint64]bool) error {
	var todo []member
	for _, mb := range members {
		switch {
		case nospace[mb.id()] && mb.free() > 0,
			urgent && mb.free() >= mb.st.DbSize/10:
			todo = append(todo, mb)
		case !urgent && mb.free() >= m.cfg.DefragMinFree && mb.free()*2 >= mb.st.DbSize &&
			time.Since(m.lastDefrag[mb.id()]) >= m.cfg.DefragEvery:
			todo = append(todo, mb)
		}
	}
	if !urgent && len(todo) > 1 {
		slices.SortFunc(todo, func(a, b member) int { return cmp.Compare(b.free(), a.free()) })
		todo = todo[:1]
	}
	for _, mb := range todo {
		dctx, cancel := context.WithTimeout(ctx, slowCallTimeout)
		start := time.Now()
		_, err := m.cli.Defragment(dctx, mb.endpoint)
		cancel()
		if err != nil {
			return fmt.Errorf("defragment etcd member %s at %q: %w", mb, mb.endpoint, err)
		}
		now := time.Now()
		m.lastDefrag[mb.id()] = now
		s.Defrags++
		s.LastDefrag = now
		after := int64(-1)
		sctx, cancel := context.WithTimeout(ctx, callTimeout)
		if st, err := m.cli.Status(sctx, mb.endpoint); err == nil {
			after = st.DbSize
		}
		cancel()
		m.log.Info("defragmented etcd member", "member", mb.String(), "endpoint", mb.endpoint,
			"db_size_before", mb.st.DbSize, "in_use_before", mb.st.DbSizeInUse, "db_size_after", after,
			"quota", mb.st.DbSizeQuota, "took", now.Sub(start))
	}
	return nil
}

// disarm clears the NOSPACE alarms of members that have room again. One
// still full keeps its alarm: the next write would raise it again, and the
// error says what has to change.
func (m *Maintainer) disarm(ctx context.Context, s *MaintainStats, members []member, nospace map[uint64]bool) error {
	var errs []error
	for id := range nospace {
		i := slices.IndexFunc(members, func(mb member) bool { return mb.id() == id })
		if i < 0 {
			// In an embedded cluster each manager sees its own member; the
			// manager of this one clears it after defragmenting it.
			m.log.Warn("NOSPACE alarm on an etcd member this manager does not inspect", "member", fmt.Sprintf("%x", id))
			continue
		}
		mb := members[i]
		if !mb.hasRoom() {
			errs = append(errs, fmt.Errorf("etcd member %s still uses %d of its %d-byte quota (%d in use) after compaction and defragmentation: raise the quota",
				mb, mb.st.DbSize, mb.st.DbSizeQuota, mb.st.DbSizeInUse))
			continue
		}
		actx, cancel := context.WithTimeout(ctx, callTimeout)
		_, err := m.cli.AlarmDisarm(actx, &clientv3.AlarmMember{MemberID: id, Alarm: pb.AlarmType_NOSPACE})
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("disarm NOSPACE alarm of etcd member %s: %w", mb, err))
			continue
		}
		s.AlarmsCleared++
		m.log.Warn("cleared etcd NOSPACE alarm: writes accepted again", "member", mb.String(),
			"db_size", mb.st.DbSize, "in_use", mb.st.DbSizeInUse, "quota", mb.st.DbSizeQuota, "compacted_to", s.CompactedTo)
	}
	return errors.Join(errs...)
}
