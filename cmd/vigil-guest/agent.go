package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/guestproto"
)

// agent holds everything the protocol loop needs from the outside world, so
// tests can substitute a fake /proc and clock.
type agent struct {
	proc     fs.FS // rooted at /proc
	interval time.Duration
	now      func() time.Time
	log      *slog.Logger
}

// run speaks the protocol on rw until ctx is cancelled or rw fails. Heartbeats
// are written from their own goroutine because writes to a virtio-serial port
// block while no host process has the port open; ping handling must not wait
// behind them. run returns when reading ends (io.EOF or error) or when a
// heartbeat cannot be written; it does not wait for a write blocked in the
// kernel, which only closing rw can release.
func (a *agent) run(ctx context.Context, rw io.ReadWriter) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	enc := guestproto.NewEncoder(rw)

	errc := make(chan error, 2)
	now := make(chan struct{}, 1)
	go func() { errc <- a.heartbeats(ctx, enc, now) }()
	go func() { errc <- a.serve(ctx, rw, enc, now) }()

	select {
	case <-ctx.Done():
		return ctx.Err()
	case err := <-errc:
		return err
	}
}

// heartbeats sends one heartbeat immediately and then one per interval,
// and one more at once whenever now says so.
func (a *agent) heartbeats(ctx context.Context, enc *guestproto.Encoder, now <-chan struct{}) error {
	t := time.NewTicker(a.interval)
	defer t.Stop()
	var seq uint64
	for {
		seq++
		hb, err := a.heartbeat(seq)
		if err != nil {
			// A partial heartbeat is still proof of life; report what we
			// have rather than going silent.
			a.log.Warn("reading guest metrics", "err", err)
		}
		if err := enc.Encode(guestproto.Message{Type: guestproto.TypeHeartbeat, Heartbeat: hb}); err != nil {
			return fmt.Errorf("send heartbeat %d: %w", seq, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		case <-now:
			t.Reset(a.interval)
		}
	}
}

// serve answers pings until the reader ends; a heartbeat asked for goes
// to the heartbeat loop through now.
func (a *agent) serve(ctx context.Context, r io.Reader, enc *guestproto.Encoder, now chan<- struct{}) error {
	dec := guestproto.NewDecoder(r)
	for ctx.Err() == nil {
		m, err := dec.Decode()
		switch {
		case errors.Is(err, guestproto.ErrMalformed), errors.Is(err, guestproto.ErrVersion):
			a.log.Debug("ignoring message", "err", err)
			continue
		case err != nil:
			return fmt.Errorf("read: %w", err)
		}
		switch m.Type {
		case guestproto.TypePing:
			if err := enc.Encode(guestproto.Message{Type: guestproto.TypePong, ID: m.ID}); err != nil {
				return fmt.Errorf("send pong: %w", err)
			}
		case guestproto.TypeHeartbeatNow:
			select { // one pending is enough, however many are asked for
			case now <- struct{}{}:
			default:
			}
		case guestproto.TypeExec:
			// Commands run on their own goroutine: a long one must not hold
			// up pings or other commands.
			go func(m guestproto.Message) {
				// Cut to what one line can carry: an over-long line
				// would never reach the host, which would wait in vain.
				res := guestproto.FitExecResult(m.ID, runExec(ctx, *m.Exec))
				if err := enc.Encode(guestproto.Message{Type: guestproto.TypeExecResult, ID: m.ID, ExecResult: &res}); err != nil {
					a.log.Warn("send exec result", "err", err)
				}
			}(m)
		default:
			a.log.Debug("ignoring message", "type", m.Type)
		}
	}
	return ctx.Err()
}

// heartbeat gathers metrics from /proc. It always returns a heartbeat; err
// reports the first metric that could not be read.
func (a *agent) heartbeat(seq uint64) (*guestproto.Heartbeat, error) {
	hb := &guestproto.Heartbeat{Seq: seq, SentAt: a.now()}
	var errs []error
	if b, err := fs.ReadFile(a.proc, "sys/kernel/random/boot_id"); err != nil {
		errs = append(errs, err)
	} else {
		hb.BootID = strings.TrimSpace(string(b))
	}
	if v, err := firstFloat(a.proc, "uptime"); err != nil {
		errs = append(errs, err)
	} else {
		hb.UptimeSeconds = v
	}
	if v, err := firstFloat(a.proc, "loadavg"); err != nil {
		errs = append(errs, err)
	} else {
		hb.Load1 = v
	}
	if total, avail, err := meminfo(a.proc); err != nil {
		errs = append(errs, err)
	} else {
		hb.MemTotalBytes = total
		if avail <= total {
			hb.MemUsedBytes = total - avail
		}
	}
	return hb, errors.Join(errs...)
}

func firstFloat(fsys fs.FS, name string) (float64, error) {
	b, err := fs.ReadFile(fsys, name)
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0, fmt.Errorf("parse /proc/%s: empty", name)
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return 0, fmt.Errorf("parse /proc/%s: %w", name, err)
	}
	return v, nil
}

// meminfo returns MemTotal and MemAvailable in bytes.
func meminfo(fsys fs.FS) (total, avail uint64, err error) {
	b, err := fs.ReadFile(fsys, "meminfo")
	if err != nil {
		return 0, 0, err
	}
	var haveTotal, haveAvail bool
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		var dst *uint64
		switch f[0] {
		case "MemTotal:":
			dst, haveTotal = &total, true
		case "MemAvailable:":
			dst, haveAvail = &avail, true
		default:
			continue
		}
		v, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("parse /proc/meminfo %s: %w", f[0], err)
		}
		if len(f) > 2 && f[2] == "kB" {
			v *= 1024
		}
		*dst = v
	}
	if !haveTotal || !haveAvail {
		return 0, 0, errors.New("parse /proc/meminfo: MemTotal or MemAvailable missing")
	}
	return total, avail, nil
}

// cmdlineInterval returns the vigil.heartbeat=DURATION value from a kernel
// command line, if present and valid.
func cmdlineInterval(cmdline string) (time.Duration, bool, error) {
	for _, f := range strings.Fields(cmdline) {
		v, ok := strings.CutPrefix(f, "vigil.heartbeat=")
		if !ok {
			continue
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return 0, false, fmt.Errorf("invalid vigil.heartbeat=%q on kernel command line", v)
		}
		return d, true, nil
	}
	return 0, false, nil
}

// findPort returns the /dev path of the virtio-serial port called name, by
// scanning <sysDir>/class/virtio-ports/*/name. It returns fs.ErrNotExist when
// no such port exists (yet).
func findPort(sysDir, devDir, name string) (string, error) {
	ports, err := filepath.Glob(filepath.Join(sysDir, "class", "virtio-ports", "*", "name"))
	if err != nil {
		return "", fmt.Errorf("scan virtio ports: %w", err)
	}
	for _, p := range ports {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the port may be going away; keep looking
		}
		if strings.TrimSpace(string(b)) == name {
			return filepath.Join(devDir, filepath.Base(filepath.Dir(p))), nil
		}
	}
	return "", fmt.Errorf("virtio port %q: %w", name, fs.ErrNotExist)
}

// waitPort polls for the port until it appears and can be opened. The device
// node may show up in sysfs slightly before devtmpfs creates it, so an open
// failure is retried too.
func waitPort(ctx context.Context, sysDir, devDir string, every time.Duration, log *slog.Logger) (*os.File, error) {
	logged := false
	for {
		path, err := findPort(sysDir, devDir, guestproto.PortName)
		if err == nil {
			var f *os.File
			f, err = os.OpenFile(path, os.O_RDWR, 0)
			if err == nil {
				log.Info("opened agent port", "path", path)
				return f, nil
			}
		}
		if !logged {
			log.Info("waiting for agent port", "name", guestproto.PortName, "err", err)
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(every):
		}
	}
}

// eofRetryReader turns end-of-file into a pause and a retry. A virtio-serial
// read returns 0 bytes while no host process has the port open; that is "host
// not there yet", not the end of the conversation.
type eofRetryReader struct {
	ctx   context.Context
	r     io.Reader
	every time.Duration
}

func (e *eofRetryReader) Read(p []byte) (int, error) {
	for {
		n, err := e.r.Read(p)
		if n > 0 || (err != nil && !errors.Is(err, io.EOF)) {
			return n, err
		}
		select {
		case <-e.ctx.Done():
			return 0, e.ctx.Err()
		case <-time.After(e.every):
		}
	}
}
