package qemu

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/qemu/qmp"
)

// Live migration moves a running guest from one QEMU (the source) to another
// started with Machine.Incoming (the destination) over TCP. Both open the
// same disk image: the destination of an incoming migration opens it
// inactive and takes it over (with QEMU's image locks) when the source hands
// it on at the switchover. A caller goes:
//
//	uri, err := MigrateIncoming(ctx, dst, "127.0.0.1") // on the destination
//	stats, err := MigrateOut(ctx, src, uri)             // on the source
//	err = WaitIncoming(ctx, dst)                        // guest runs on dst
//	src quits; once it is gone: AddHostFwd(ctx, dst, port)

// MigrationStats describe a finished live migration, as QEMU measured it.
type MigrationStats struct {
	Total    time.Duration // from the migrate command to completion
	Downtime time.Duration // the guest's final stop
	Setup    time.Duration
	Bytes    int64 // RAM bytes sent
}

// liveMigrationInfo is the part of query-migrate a live migration reads,
// on top of what SaveState reads.
type liveMigrationInfo struct {
	migrationInfo
	TotalTime int64 `json:"total-time"`
	SetupTime int64 `json:"setup-time"`
	RAM       struct {
		Transferred int64 `json:"transferred"`
	} `json:"ram"`
	// SocketAddress is set on a destination listening on TCP: the
	// addresses it actually bound, so port 0 can be asked for.
	SocketAddress []struct {
		Type string `json:"type"`
		Host string `json:"host"`
		Port string `json:"port"` // a string in the QAPI schema
	} `json:"socket-address"`
}

func (mi liveMigrationInfo) stats() MigrationStats {
	return MigrationStats{
		Total:    time.Duration(mi.TotalTime) * time.Millisecond,
		Downtime: time.Duration(mi.Downtime) * time.Millisecond,
		Setup:    time.Duration(mi.SetupTime) * time.Millisecond,
		Bytes:    mi.RAM.Transferred,
	}
}

// MigrationTLS are the credentials of a migration stream, for QEMU's
// tls-creds-x509: Dir holds ca-cert.pem, server-cert.pem, server-key.pem,
// client-cert.pem and client-key.pem. Peer is who the other end must be:
// on the destination, the subject DN of the source's certificate (QEMU's
// authz-simple accepts only that one); on the source, the destination's
// host name, checked against its certificate.
type MigrationTLS struct {
	Dir  string
	Peer string
}

// tlsCredsID and tlsAuthzID name the QOM objects a migration uses.
const (
	tlsCredsID = "vigil-mig-tls"
	tlsAuthzID = "vigil-mig-authz"
)

// setMigrationTLS makes the next migration (in or out) go over TLS with
// tls, or (tls nil) in the clear, replacing what an earlier one left. The
// credentials are read afresh, so a renewed certificate takes effect.
func setMigrationTLS(ctx context.Context, mon *qmp.Monitor, tls *MigrationTLS, server bool) error {
	mon.Run(ctx, "migrate-set-parameters", map[string]any{"tls-creds": "", "tls-authz": "", "tls-hostname": ""}, nil)
	mon.Run(ctx, "object-del", map[string]any{"id": tlsAuthzID}, nil)
	mon.Run(ctx, "object-del", map[string]any{"id": tlsCredsID}, nil)
	if tls == nil {
		return nil
	}
	if tls.Dir == "" || tls.Peer == "" {
		return errors.New("migration tls needs credentials and a peer")
	}
	endpoint := "client"
	if server {
		endpoint = "server"
	}
	if err := mon.Run(ctx, "object-add", map[string]any{"qom-type": "tls-creds-x509", "id": tlsCredsID, "dir": tls.Dir,
		"endpoint": endpoint, "verify-peer": true}, nil); err != nil {
		return fmt.Errorf("load migration tls credentials from %s: %w", tls.Dir, err)
	}
	params := map[string]any{"tls-creds": tlsCredsID}
	if server {
		if err := mon.Run(ctx, "object-add", map[string]any{"qom-type": "authz-simple", "id": tlsAuthzID, "identity": tls.Peer}, nil); err != nil {
			return fmt.Errorf("allow migration from %s: %w", tls.Peer, err)
		}
		params["tls-authz"] = tlsAuthzID
	} else {
		params["tls-hostname"] = tls.Peer
	}
	return mon.Run(ctx, "migrate-set-parameters", params, nil)
}

// MigrateIncoming makes a QEMU started with Machine.Incoming listen for a
// live migration on listenHost, on a port the kernel picks, and returns the
// URI to give MigrateOut on the source. QEMU 7.2 accepts port 0 and reports
// the bound address in query-migrate's socket-address; the URI names that
// address, so on a wildcard listenHost (0.0.0.0) the caller puts in one the
// source can reach. With tls the stream must come over TLS from tls.Peer.
func MigrateIncoming(ctx context.Context, mon *qmp.Monitor, listenHost string, tls *MigrationTLS) (string, error) {
	listen := "tcp:" + net.JoinHostPort(listenHost, "0")
	// MIGRATION events let WaitIncoming wake at the end instead of polling.
	caps := []map[string]any{{"capability": "events", "state": true}}
	if err := mon.Run(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return "", fmt.Errorf("listen for migration on %s: %w", listen, err)
	}
	if err := setMigrationTLS(ctx, mon, tls, true); err != nil {
		return "", fmt.Errorf("listen for migration on %s: %w", listen, err)
	}
	if err := mon.Run(ctx, "migrate-incoming", map[string]any{"uri": listen}, nil); err != nil {
		return "", fmt.Errorf("listen for migration on %s: %w", listen, err)
	}
	var mi liveMigrationInfo
	if err := mon.Run(ctx, "query-migrate", nil, &mi); err != nil {
		return "", fmt.Errorf("listen for migration on %s: %w", listen, err)
	}
	for _, a := range mi.SocketAddress {
		if a.Type == "inet" && a.Port != "" && a.Port != "0" {
			return "tcp:" + net.JoinHostPort(a.Host, a.Port), nil
		}
	}
	return "", fmt.Errorf("listen for migration on %s: qemu reports no bound tcp address", listen)
}

// MigrateOut live-migrates the guest to the destination listening at uri
// (from MigrateIncoming) and waits until QEMU reports completion. The
// allowed final stop starts short and is relaxed the longer the migration
// runs (downtimeSteps), so a busy guest still converges.
//
// On success the source is left in "postmigrate" (paused, its disk handed
// over) and the caller quits it; it must not be continued while the
// destination runs. On failure or when ctx ends, the migration is cancelled
// and a source guest that was running is running again. Should the
// migration complete while being cancelled, that is reported as success:
// the guest then lives on the destination.
//
// Only a tcp:IP:PORT uri is accepted: a migration never runs a command
// (exec:) or opens a local path (unix:, file:) because of a uri it was
// given. With tls the stream is encrypted and the destination must present
// the certificate of tls.Peer.
//
// With stopFirst (see LivePrecopySafe) the guest is stopped before the
// stream starts and the whole memory goes in one pass; Downtime is then
// the time from that stop to completion.
func MigrateOut(ctx context.Context, mon *qmp.Monitor, uri string, tls *MigrationTLS, stopFirst bool) (MigrationStats, error) {
	if err := CheckMigrationURI(uri); err != nil {
		return MigrationStats{}, err
	}
	st, err := mon.QueryStatus(ctx)
	if err != nil {
		return MigrationStats{}, fmt.Errorf("migrate to %s: %w", uri, err)
	}
	if err := setMigrationTLS(ctx, mon, tls, false); err != nil {
		return MigrationStats{}, fmt.Errorf("migrate to %s: %w", uri, err)
	}
	// A later save (suspend, snapshot) streams to a local socket in the
	// clear: leave no TLS settings behind.
	defer setMigrationTLS(context.WithoutCancel(ctx), mon, nil, false)
	wasRunning := st.Running
	// Capabilities and parameters stay set in QEMU between migrations: a
	// snapshot by SaveState may have left pause-before-switchover on, which
	// would hold this migration at the switchover forever. "events" makes
	// QEMU send the MIGRATION events the wait below wakes on.
	caps := []map[string]any{{"capability": "pause-before-switchover", "state": false}, {"capability": "events", "state": true}}
	if err := mon.Run(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return MigrationStats{}, fmt.Errorf("migrate to %s: %w", uri, err)
	}
	params := map[string]any{"max-bandwidth": int64(migrationBandwidth), "downtime-limit": downtimeSteps[0].limitMS}
	if err := mon.Run(ctx, "migrate-set-parameters", params, nil); err != nil {
		return MigrationStats{}, fmt.Errorf("migrate to %s: %w", uri, err)
	}

	// QEMU announces each status change with a MIGRATION event, so the
	// loop below queries on those (and on a slow tick for the downtime
	// steps) instead of polling: queries compete with the migration for
	// QEMU's main lock.
	events, unsubscribe := mon.Subscribe()
	defer unsubscribe()
	start := time.Now()
	stopped := time.Time{}
	if stopFirst && wasRunning {
		if err := mon.Stop(ctx); err != nil {
			return MigrationStats{}, fmt.Errorf("migrate to %s: stop the guest first: %w", uri, err)
		}
		stopped = time.Now()
	}
	if err := mon.Run(ctx, "migrate", map[string]any{"uri": uri}, nil); err != nil {
		return abortMigration(ctx, mon, wasRunning, fmt.Errorf("migrate to %s: %w", uri, err))
	}
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	step := 0
	for {
		select {
		case <-ctx.Done():
			return abortMigration(ctx, mon, wasRunning, fmt.Errorf("migrate to %s: %w", uri, ctx.Err()))
		case ev, ok := <-events:
			if !ok {
				return MigrationStats{}, fmt.Errorf("migrate to %s: %w", uri, mon.Err())
			}
			if !terminalMigrationEvent(ev) {
				continue
			}
		case <-tick.C:
			if step+1 < len(downtimeSteps) && time.Since(start) > downtimeSteps[step+1].after {
				step++
				if err := mon.Run(ctx, "migrate-set-parameters", map[string]any{"downtime-limit": downtimeSteps[step].limitMS}, nil); err != nil {
					return abortMigration(ctx, mon, wasRunning, fmt.Errorf("migrate to %s: relax downtime limit: %w", uri, err))
				}
			}
		}
		var mi liveMigrationInfo
		if err := mon.Run(ctx, "query-migrate", nil, &mi); err != nil {
			return abortMigration(ctx, mon, wasRunning, fmt.Errorf("migrate to %s: %w", uri, err))
		}
		switch mi.Status {
		case "completed":
			stats := completedStats(ctx, mon, mi)
			if !stopped.IsZero() {
				stats.Downtime = time.Since(stopped)
			}
			return stats, nil
		case "failed", "cancelled":
			return abortMigration(ctx, mon, wasRunning, fmt.Errorf("migrate to %s: migration %s: %s", uri, mi.Status, mi.ErrorDesc))
		}
	}
}

// LivePrecopySafe reports whether m's memory can be copied while its guest
// runs (precopy: live migration, live snapshots). Under KVM it can. Under
// TCG, QEMU before 9.0 (Debian 12 has 7.2) loses track of pages written
// during the copy when the RAM block's size is a multiple of 256 KiB: the
// dirty bitmap's 64-pages-at-a-time fast path clears the bits without
// re-arming TCG's dirty tracking in the TLB, so later writes through a
// cached TLB entry are never marked and never resent (fixed upstream by
// 03bfc2188f06, "physmem: Fix migration dirty bitmap coherency with TCG
// memory access", QEMU 9.0). A busy guest so copied crashed on the
// destination after most migrations (TestPrecopyUnderTCG). A machine with
// RAMPad has RAM that is not such a multiple, which keeps QEMU on the
// page-by-page path that re-arms it: it is copied live; one without (a VM
// made before Vigil knew this keeps its hardware) is stopped for the copy.
// Only main RAM is padded: a display's 16 MiB video memory still takes the
// fast path, so under TCG a live copy may leave stale pixels on the screen
// of a VM with a display until it redraws; what the guest runs on is whole.
func LivePrecopySafe(m Machine) bool { return m.Accel == AccelKVM || m.RAMPad }

// CertDN is a certificate's subject as QEMU's TLS authorization (GnuTLS)
// names it, for MigrationTLS.Peer on a destination.
// GnuTLS writes the attributes in the certificate's own order (not
// reversed as RFC 4514 has it): "O=vigil-hosts,CN=h1".
func CertDN(c *x509.Certificate) string {
	short := map[string]string{"2.5.4.3": "CN", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST"}
	var parts []string
	for _, rdn := range c.Subject.ToRDNSequence() {
		for _, a := range rdn {
			name, ok := short[a.Type.String()]
			if !ok {
				name = a.Type.String()
			}
			parts = append(parts, fmt.Sprintf("%s=%v", name, a.Value))
		}
	}
	return strings.Join(parts, ",")
}

// SubjectDN is the DN CertDN gives for a certificate whose subject is
// organization org and common name cn (as Vigil's node certificates are).
func SubjectDN(org, cn string) string { return "O=" + org + ",CN=" + cn }

// CheckMigrationURI accepts only tcp:IP:PORT with an IP literal and a port
// in range.
func CheckMigrationURI(uri string) error {
	hostport, ok := strings.CutPrefix(uri, "tcp:")
	if !ok {
		return fmt.Errorf("migration uri %q refused: only tcp:IP:PORT is allowed", uri)
	}
	host, port, err := net.SplitHostPort(hostport)
	if err != nil || net.ParseIP(host) == nil {
		return fmt.Errorf("migration uri %q refused: only tcp:IP:PORT with an IP address is allowed", uri)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("migration uri %q refused: bad port", uri)
	}
	return nil
}

// completedStats returns the figures of a completed migration. QEMU (7.2)
// sets "completed" a moment before it fills in total-time and downtime, and
// a query in between reads zeros; this asks again until they are there.
func completedStats(ctx context.Context, mon *qmp.Monitor, mi liveMigrationInfo) MigrationStats {
	for i := 0; mi.TotalTime == 0 && i < 100; i++ {
		time.Sleep(2 * time.Millisecond)
		var again liveMigrationInfo
		if mon.Run(ctx, "query-migrate", nil, &again) != nil {
			break
		}
		mi = again
	}
	return mi.stats()
}

// terminalMigrationEvent is true for a MIGRATION event that ends a
// migration. Other events (setup, active, MIGRATION_PASS, STOP) need no
// query.
func terminalMigrationEvent(ev qmp.Event) bool {
	if ev.Name != "MIGRATION" {
		return false
	}
	var d struct {
		Status string `json:"status"`
	}
	if json.Unmarshal(ev.Data, &d) != nil {
		return true // let query-migrate tell
	}
	switch d.Status {
	case "completed", "failed", "cancelled":
		return true
	}
	return false
}

// abortMigration cancels a failed outgoing migration and resumes the source
// guest if it was running before. It returns cause, unless the migration
// turned out to have completed after all.
func abortMigration(ctx context.Context, mon *qmp.Monitor, wasRunning bool, cause error) (MigrationStats, error) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	mon.Run(cctx, "migrate_cancel", nil, nil)
	waitMigration(cctx, mon, "cancelled", "failed", "completed")
	var mi liveMigrationInfo
	if err := mon.Run(cctx, "query-migrate", nil, &mi); err != nil {
		return MigrationStats{}, errors.Join(cause, err)
	}
	if mi.Status == "completed" {
		// The destination has the guest: continuing the source now would
		// run it twice on one disk.
		return completedStats(cctx, mon, mi), nil
	}
	if !wasRunning {
		return MigrationStats{}, cause
	}
	// QEMU restarts the source itself after a failed or cancelled
	// migration; this covers a stop it left behind.
	st, err := mon.QueryStatus(cctx)
	if err == nil && !st.Running {
		err = mon.Cont(cctx)
	}
	if err != nil {
		return MigrationStats{}, errors.Join(cause, fmt.Errorf("resume the source: %w", err))
	}
	return MigrationStats{}, cause
}

// WaitIncoming waits until the destination of a live migration has taken
// the whole stream and runs the guest. QEMU (7.2) restarts the guest itself
// at the end of an incoming migration when the source was running, and
// sets "completed" only after that, so a destination that completed but is
// not running holds a guest that was paused on the source; that is
// reported as an error naming the state. A failed incoming migration makes
// QEMU exit, which ends the monitor.
func WaitIncoming(ctx context.Context, mon *qmp.Monitor) error {
	events, unsubscribe := mon.Subscribe()
	defer unsubscribe()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		var mi liveMigrationInfo
		if err := mon.Run(ctx, "query-migrate", nil, &mi); err != nil {
			return fmt.Errorf("wait for incoming migration: %w", err)
		}
		switch mi.Status {
		case "completed":
			st, err := mon.QueryStatus(ctx)
			if err != nil {
				return fmt.Errorf("wait for incoming migration: %w", err)
			}
			if st.Status == "paused" {
				// The source stopped the guest for the copy (MigrateOut's
				// stopFirst): it ran before and runs on here. Only running
				// guests are live-migrated.
				if err := mon.Cont(ctx); err != nil {
					return fmt.Errorf("incoming migration completed; continue the guest: %w", err)
				}
				st.Running = true
			}
			if !st.Running {
				return fmt.Errorf("incoming migration completed but the guest is %s", st.Status)
			}
			setMigrationTLS(ctx, mon, nil, true) // later local saves go in the clear
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("incoming migration %s: %s", mi.Status, mi.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for incoming migration: %w", ctx.Err())
		case _, ok := <-events:
			if !ok {
				return fmt.Errorf("wait for incoming migration: %w", mon.Err())
			}
		case <-tick.C:
		}
	}
}

// AddHostFwd forwards 127.0.0.1:port to the guest's port 80, as Args does
// unless Machine.NoHostFwd is set. The destination of a live migration adds
// it once the source QEMU has exited: until then the source holds the port,
// and the forward is not part of the migrated state.
func AddHostFwd(ctx context.Context, mon *qmp.Monitor, port int) error {
	rule := hostFwdRule(port) + "-:80"
	out, err := mon.HMP(ctx, "hostfwd_add net0 "+rule)
	if err != nil {
		return fmt.Errorf("add host forward %s: %w", rule, err)
	}
	// HMP reports failure as text ("Could not set up host forwarding
	// rule ..."), and success with no output at all.
	if out = strings.TrimSpace(out); out != "" {
		return fmt.Errorf("add host forward %s: %s", rule, strings.TrimSpace(firstLine(out)))
	}
	return nil
}

// RemoveHostFwd removes the forward AddHostFwd (or Args) set up for port.
func RemoveHostFwd(ctx context.Context, mon *qmp.Monitor, port int) error {
	rule := hostFwdRule(port)
	out, err := mon.HMP(ctx, "hostfwd_remove net0 "+rule)
	if err != nil {
		return fmt.Errorf("remove host forward %s: %w", rule, err)
	}
	// Success reads "host forwarding rule for ... removed"; failures
	// ("... not found", "unrecognized netdev id ...") are text as well.
	if out = strings.TrimSpace(out); !strings.HasSuffix(out, " removed") {
		return fmt.Errorf("remove host forward %s: %s", rule, strings.TrimSpace(firstLine(out)))
	}
	return nil
}
