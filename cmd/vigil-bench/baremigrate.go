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
func (b *bench) bareMigrate(ctx context.Context) (qemu.MigrationStats, error) {
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
	// destination resumes the guest a moment later, once it has loaded it.
	for {
		st, err := dv.mon.QueryStatus(ctx)
		if err != nil {
			return qemu.MigrationStats{}, fmt.Errorf("bare migrate: destination: %w", err)
		}
		if st.Running {
			break
		}
		if st.Status != "inmigrate" || time.Now().After(deadline) {
			return qemu.MigrationStats{}, fmt.Errorf("bare migrate: destination is %s after the migration", st.Status)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := nextHeartbeat(dst.AgentSocket(), 30*time.Second); err != nil {
		return qemu.MigrationStats{}, fmt.Errorf("bare migrate: destination: %w", err)
	}
	return qemu.MigrationStats{
		Total:    time.Duration(mi.TotalTime) * time.Millisecond,
		Downtime: time.Duration(mi.Downtime) * time.Millisecond,
		Setup:    time.Duration(mi.SetupTime) * time.Millisecond,
		Bytes:    mi.RAM.Transferred,
	}, nil
}
