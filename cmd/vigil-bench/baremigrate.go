package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/vigil-project/vigil/internal/qemu"
)

// bareMigrate is the baseline for live migration: it boots the image with
// bare QEMU and moves the guest by hand to a second bare QEMU on the same
// disk, with the QMP commands an operator would type (migrate-incoming,
// migrate, query-migrate), and returns QEMU's own figures.
//
// Where a live copy is unsafe (qemu.LivePrecopySafe: under TCG a guest
// writing to memory during the copy was corrupted on QEMU 7.2) the operator
// has to do what Vigil does there: stop the guest, migrate it in one pass
// and cont it on the destination. The downtime is then counted from the stop.
func (b *bench) bareMigrate(ctx context.Context) (qemu.MigrationStats, error) {
	stopFirst := !b.livePrecopy()
	src, err := b.bareMachine("migsrc", 128<<20, "")
	if err != nil {
		return qemu.MigrationStats{}, err
	}
	// The destination is the same machine, listening for the migration;
	// it cannot forward the host port the source still holds.
	dst := src
	dst.Dir, dst.Incoming, dst.NoHostFwd = filepath.Join(b.tmp, "migdst"), true, true
	if err := os.MkdirAll(dst.Dir, 0o755); err != nil {
		return qemu.MigrationStats{}, err
	}

	sv, err := startBare(ctx, src)
	if err != nil {
		return qemu.MigrationStats{}, err
	}
	defer sv.stop()
	if err := nextHeartbeat(src.AgentSocket(), 60*time.Second); err != nil {
		return qemu.MigrationStats{}, err
	}
	dv, err := startBare(ctx, dst)
	if err != nil {
		return qemu.MigrationStats{}, err
	}
	defer dv.stop()

	port, err := freePort()
	if err != nil {
		return qemu.MigrationStats{}, err
	}
	uri := "tcp:127.0.0.1:" + strconv.Itoa(port)
	if err := dv.mon.Run(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil); err != nil {
		return qemu.MigrationStats{}, fmt.Errorf("bare migrate: %w", err)
	}
	// The same bandwidth and downtime limit as qemu.MigrateOut starts
	// with, so the comparison is of the procedure, not of the tuning.
	params := map[string]any{"max-bandwidth": int64(64 << 30), "downtime-limit": 5}
	if err := sv.mon.Run(ctx, "migrate-set-parameters", params, nil); err != nil {
		return qemu.MigrationStats{}, fmt.Errorf("bare migrate: %w", err)
	}
	var stopped time.Time
	if stopFirst {
		if err := sv.mon.Stop(ctx); err != nil {
			return qemu.MigrationStats{}, fmt.Errorf("bare migrate: stop the guest first: %w", err)
		}
		stopped = time.Now()
	}
	issued := time.Now()
	if err := sv.mon.Run(ctx, "migrate", map[string]any{"uri": uri}, nil); err != nil {
		return qemu.MigrationStats{}, fmt.Errorf("bare migrate: %w", err)
	}
	// An operator watches for a while, then gives up.
	deadline := time.Now().Add(2 * time.Minute)
	type migrationInfo struct {
		Status    string `json:"status"`
		ErrorDesc string `json:"error-desc"`
		TotalTime int64  `json:"total-time"`
		Downtime  int64  `json:"downtime"`
		SetupTime int64  `json:"setup-time"`
		RAM       struct {
			Transferred int64 `json:"transferred"`
		} `json:"ram"`
	}
	var mi migrationInfo
	// QEMU sets "completed" a moment before it fills in the times.
	for mi.Status != "completed" || mi.TotalTime == 0 {
		time.Sleep(20 * time.Millisecond)
		mi = migrationInfo{}
		if err := sv.mon.Run(ctx, "query-migrate", nil, &mi); err != nil {
			return qemu.MigrationStats{}, fmt.Errorf("bare migrate: %w", err)
		}
		if mi.Status == "failed" || mi.Status == "cancelled" {
			return qemu.MigrationStats{}, fmt.Errorf("bare migrate: migration %s: %s", mi.Status, mi.ErrorDesc)
		}
		if time.Now().After(deadline) {
			return qemu.MigrationStats{}, fmt.Errorf("bare migrate: still %s after 2 minutes", mi.Status)
		}
	}
	// The guest must carry on at the destination for the figures to count.
	// The source reports completion when it has sent everything; the
	// destination resumes the guest a moment later, once it has loaded it,
	// or, stopped first, holds it paused for the operator's cont.
	for {
		st, err := dv.mon.QueryStatus(ctx)
		if err != nil {
			return qemu.MigrationStats{}, fmt.Errorf("bare migrate: destination: %w", err)
		}
		if st.Running {
			break
		}
		if stopFirst && st.Status == "paused" {
			if err := dv.mon.Cont(ctx); err != nil {
				return qemu.MigrationStats{}, fmt.Errorf("bare migrate: destination: cont: %w", err)
			}
			continue
		}
		if st.Status != "inmigrate" || time.Now().After(deadline) {
			return qemu.MigrationStats{}, fmt.Errorf("bare migrate: destination is %s after the migration", st.Status)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := nextHeartbeat(dst.AgentSocket(), 30*time.Second); err != nil {
		return qemu.MigrationStats{}, fmt.Errorf("bare migrate: destination: %w", err)
	}
	stats := qemu.MigrationStats{
		Total:    time.Duration(mi.TotalTime) * time.Millisecond,
		Downtime: time.Duration(mi.Downtime) * time.Millisecond,
		Setup:    time.Duration(mi.SetupTime) * time.Millisecond,
		Bytes:    mi.RAM.Transferred,
	}
	if stopFirst {
		// QEMU's downtime covers only its final pass, as it did not stop
		// the guest itself. Count from the stop, as MigrateOut does: the
		// wait before the migrate command plus QEMU's total-time (from that
		// command to completion, on QEMU's clock, so no polling error).
		stats.Downtime = issued.Sub(stopped) + stats.Total
	}
	return stats, nil
}
