package qemu

import (
	"context"
	"encoding/json"

	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/vigil-project/vigil/internal/qemu/qmp"
)

// migrationBandwidth lifts QEMU's default cap (128 MiB/s in 7.2), which
// would otherwise make saving state to a local file slower than the disk.
const migrationBandwidth = 64 << 30

// downtimeSteps relax the allowed final stop of a live save the longer it
// runs: a quiet guest converges at the first step, a busy one still finishes.
var downtimeSteps = []struct {
	after   time.Duration
	limitMS int
}{{0, 5}, {2 * time.Second, 50}, {5 * time.Second, 300}, {10 * time.Second, 2000}}

// SaveOptions tune SaveState.
type SaveOptions struct {
	// AtSwitchover, if set, runs while the guest is stopped for the final
	// phase of a live save (QEMU's pause-before-switchover): the moment whose
	// memory the stream holds. Snapshots freeze the disk there, so disk and
	// memory are of the same instant. Without it the save is a plain
	// migration (the caller stops the guest first for a suspend).
	AtSwitchover func(ctx context.Context) error
	// Progress is called about every 100 ms with bytes written so far.
	Progress func(written int64)
}

// SaveStats describe a finished save.
type SaveStats struct {
	Bytes    int64
	Total    time.Duration
	Downtime time.Duration // as QEMU measured it (0 when the end came by its event)
}

type migrationInfo struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
	Downtime  int64  `json:"downtime"`
}

// SaveState streams the VM's migration stream (memory, devices, CPU) into w
// over a unix socket in dir. On failure the migration is cancelled; the
// caller decides whether to resume the guest.
func SaveState(ctx context.Context, mon *qmp.Monitor, dir string, w io.Writer, o SaveOptions) (SaveStats, error) {
	start := time.Now()
	sock := dir + "/migrate.sock"
	os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		return SaveStats{}, fmt.Errorf("listen for the migration stream: %w", err)
	}
	defer os.Remove(sock)
	defer ln.Close()

	// "events": QEMU announces each status change (pre-switchover above
	// all) with a MIGRATION event, which the loop below wakes on.
	caps := []map[string]any{{"capability": "pause-before-switchover", "state": o.AtSwitchover != nil}, {"capability": "events", "state": true}}
	if err := mon.Run(ctx, "migrate-set-capabilities", map[string]any{"capabilities": caps}, nil); err != nil {
		return SaveStats{}, err
	}
	events, unsubscribe := mon.Subscribe()
	defer unsubscribe()
	// A live save aims at a short final stop: QEMU keeps copying dirty
	// memory until what is left fits the downtime limit. A guest dirtying
	// memory faster than we copy would never get there, so the limit is
	// relaxed step by step (see relaxDowntime).
	downtime := 300
	if o.AtSwitchover != nil {
		downtime = downtimeSteps[0].limitMS
	}
	// tls-creds empty: a local save is never TLS, whatever a live
	// migration of this QEMU set before.
	if err := mon.Run(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(migrationBandwidth), "downtime-limit": downtime, "tls-creds": ""}, nil); err != nil {
		return SaveStats{}, err
	}

	type copied struct {
		n   int64
		err error
	}
	done := make(chan copied, 1)
	// A writer that counts for itself (statefile.Writer) is given the
	// connection directly, so its ReadFrom copies in large chunks.
	var counter interface{ Written() int64 }
	dst := w
	if c, ok := w.(interface{ Written() int64 }); ok {
		counter = c
	} else {
		cw := &countingWriter{w: w}
		counter, dst = cw, cw
	}
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- copied{0, err}
			return
		}
		defer conn.Close()
		n, err := io.Copy(dst, conn)
		if err != nil {
			// Closing our end makes QEMU's side fail, ending the migration.
			conn.Close()
		}
		done <- copied{n, err}
	}()

	fail := func(err error) (SaveStats, error) {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		mon.Run(cctx, "migrate_cancel", nil, nil)
		ln.Close()
		waitMigration(cctx, mon, "cancelled", "failed", "completed")
		return SaveStats{}, err
	}
	if err := mon.Run(ctx, "migrate", map[string]any{"uri": "unix:" + sock}, nil); err != nil {
		return fail(fmt.Errorf("start migration: %w", err))
	}

	var copyErr error
	copyDone, switched := false, false
	step := 0
	// The switchover (the guest is stopped meanwhile) and the end are
	// caught by their MIGRATION events at once; the tick is for progress,
	// the downtime steps and a lost event. Polling query-migrate faster
	// only competed with the copy for QEMU's main lock.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	lastProgress := time.Now()
	for {
		// The status a MIGRATION event names is acted on without asking
		// again: at the switchover the guest is stopped, and a query is a
		// round trip more of it.
		evStatus := ""
		select {
		case <-ctx.Done():
			return fail(ctx.Err())
		case c := <-done:
			copyDone, copyErr = true, c.err
			if copyErr != nil {
				return fail(fmt.Errorf("write state: %w", copyErr))
			}
		case ev, ok := <-events:
			if !ok {
				return fail(fmt.Errorf("qemu monitor: %w", mon.Err()))
			}
			if ev.Name != "MIGRATION" {
				continue
			}
			var d struct {
				Status string `json:"status"`
			}
			if json.Unmarshal(ev.Data, &d) == nil && (d.Status == "pre-switchover" || d.Status == "completed") {
				evStatus = d.Status
			}
		case <-tick.C:
		}
		if o.Progress != nil && time.Since(lastProgress) > 100*time.Millisecond {
			o.Progress(counter.Written())
			lastProgress = time.Now()
		}
		if o.AtSwitchover != nil && step+1 < len(downtimeSteps) && time.Since(start) > downtimeSteps[step+1].after {
			step++
			mon.Run(ctx, "migrate-set-parameters", map[string]any{"downtime-limit": downtimeSteps[step].limitMS}, nil)
		}
		var mi migrationInfo
		if evStatus != "" {
			mi.Status = evStatus // Downtime stays 0: not known this way
		} else if err := mon.Run(ctx, "query-migrate", nil, &mi); err != nil {
			return fail(err)
		}
		switch mi.Status {
		case "pre-switchover":
			if switched {
				// migrate-continue is under way; a query can still see
				// the state it leaves.
				continue
			}
			switched = true
			if err := o.AtSwitchover(ctx); err != nil {
				return fail(fmt.Errorf("at switchover: %w", err))
			}
			if err := mon.Run(ctx, "migrate-continue", map[string]any{"state": "pre-switchover"}, nil); err != nil {
				return fail(err)
			}
		case "failed", "cancelled":
			if copyErr == nil && !copyDone {
				select {
				case c := <-done:
					copyErr = c.err
				case <-time.After(time.Second):
				}
			}
			if copyErr != nil {
				return SaveStats{}, fmt.Errorf("write state: %w", copyErr)
			}
			return SaveStats{}, fmt.Errorf("migration %s: %s", mi.Status, mi.ErrorDesc)
		case "completed":
			if !copyDone {
				select {
				case c := <-done:
					copyErr = c.err
				case <-ctx.Done():
					return SaveStats{}, ctx.Err()
				}
			}
			if copyErr != nil {
				return SaveStats{}, fmt.Errorf("write state: %w", copyErr)
			}
			return SaveStats{Bytes: counter.Written(), Total: time.Since(start), Downtime: time.Duration(mi.Downtime) * time.Millisecond}, nil
		}
	}
}

// LoadState feeds a saved migration stream to a QEMU started with Incoming
// set, and waits until QEMU has taken all of it. The guest is left paused
// or running as the stream says; the caller continues it.
func LoadState(ctx context.Context, mon *qmp.Monitor, dir string, r io.Reader, progress func(int64)) error {
	sock := dir + "/incoming.sock"
	os.Remove(sock)
	defer os.Remove(sock)
	if err := mon.Run(ctx, "migrate-incoming", map[string]any{"uri": "unix:" + sock}, nil); err != nil {
		return fmt.Errorf("start incoming migration: %w", err)
	}
	var conn net.Conn
	var err error
	for i := 0; i < 200; i++ {
		if conn, err = net.Dial("unix", sock); err == nil {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("connect to qemu's incoming socket: %w", err)
	}
	defer conn.Close()
	cw := &countingWriter{w: conn}
	copyDone := make(chan error, 1)
	go func() {
		_, err := io.Copy(cw, r)
		if uc, ok := conn.(*net.UnixConn); ok {
			uc.CloseWrite()
		}
		copyDone <- err
	}()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	last := time.Now()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-copyDone:
			if err != nil {
				return fmt.Errorf("send state to qemu: %w", err)
			}
			copyDone = nil
		case <-tick.C:
		}
		if progress != nil && time.Since(last) > 100*time.Millisecond {
			progress(cw.Load())
			last = time.Now()
		}
		var mi migrationInfo
		if err := mon.Run(ctx, "query-migrate", nil, &mi); err != nil {
			return err
		}
		switch mi.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("qemu refused the saved state: migration %s %s", mi.Status, mi.ErrorDesc)
		}
	}
}

func waitMigration(ctx context.Context, mon *qmp.Monitor, states ...string) {
	for ctx.Err() == nil {
		var mi migrationInfo
		if mon.Run(ctx, "query-migrate", nil, &mi) != nil {
			return
		}
		for _, s := range states {
			if mi.Status == s {
				return
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// countingWriter counts bytes for progress reports from another goroutine.
type countingWriter struct {
	w io.Writer
	n atomic.Int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func (c *countingWriter) Load() int64 { return c.n.Load() }

func (c *countingWriter) Written() int64 { return c.n.Load() }

// StoppedFor is how long the guest's CPUs were stopped, from the
// timestamps of QEMU's next STOP and RESUME events on events (0 if they do
// not come within 2 s: a lost event must not hold the caller). The monitor
// queues an event before the reply of the command that caused it, so once
// a cont has returned its RESUME is on its way.
func StoppedFor(events <-chan qmp.Event) time.Duration {
	var stop time.Time
	timeout := time.After(2 * time.Second)
	for {
		select {
		case e, ok := <-events:
			if !ok {
				return 0
			}
			switch e.Name {
			case "STOP":
				stop = e.Time
			case "RESUME":
				if !stop.IsZero() {
					return e.Time.Sub(stop)
				}
			}
		case <-timeout:
			return 0
		}
	}
}
