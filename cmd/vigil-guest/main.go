// Command vigil-guest is the Vigil guest agent. It runs inside the guest
// (respawned by init), finds the virtio-serial port named
// guestproto.PortName, sends periodic heartbeats on it and answers pings.
//
// It must be built with CGO_ENABLED=0: the guest image has no C library.
package main

import (
	"context"
	"flag"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// retryEvery is how often the agent looks for its port and re-reads it while
// the host side is disconnected.
const retryEvery = 200 * time.Millisecond

// readWriter pairs a reader and a writer into an io.ReadWriter.
type readWriter struct {
	io.Reader
	io.Writer
}

func main() {
	interval := flag.Duration("interval", time.Second, "heartbeat interval (kernel command line vigil.heartbeat= overrides the default)")
	procDir := flag.String("proc", "/proc", "procfs mount point")
	sysDir := flag.String("sys", "/sys", "sysfs mount point")
	devDir := flag.String("dev", "/dev", "device directory")
	verbose := flag.Bool("v", false, "debug logging")
	flag.Parse()

	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("prog", "vigil-guest")

	// An explicit -interval wins; otherwise the kernel command line may
	// override the default, which lets the host tune it per guest.
	explicit := false
	flag.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "interval" })
	if !explicit {
		if b, err := os.ReadFile(*procDir + "/cmdline"); err == nil {
			d, ok, err := cmdlineInterval(string(b))
			if err != nil {
				log.Warn("ignoring kernel command line", "err", err)
			} else if ok {
				*interval = d
			}
		}
	}
	if *interval <= 0 {
		log.Error("interval must be positive", "interval", *interval)
		os.Exit(2)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	port, err := waitPort(ctx, *sysDir, *devDir, retryEvery, log)
	if err != nil {
		log.Info("exiting", "err", err)
		return
	}
	a := &agent{proc: os.DirFS(*procDir), interval: *interval, now: time.Now, log: log}
	log.Info("agent running", "interval", *interval)
	err = a.run(ctx, readWriter{&eofRetryReader{ctx: ctx, r: port, every: retryEvery}, port})
	// Closing the port releases a write blocked in the kernel.
	port.Close()
	if ctx.Err() != nil {
		log.Info("exiting", "reason", context.Cause(ctx))
		return
	}
	log.Error("agent stopped", "err", err)
	// init respawns us immediately; pause so a persistent fault does not
	// turn into a busy loop.
	time.Sleep(time.Second)
	os.Exit(1)
}
