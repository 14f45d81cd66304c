package bootsvc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vigil-project/vigil/api"
)

// fakeFleet stands in for the manager and the machines: a reset machine
// "boots" the image it is pinned to, unless that image is broken.
type fakeFleet struct {
	mu     sync.Mutex
	reg    *Registry
	broken string
	calls  []string
	beats  map[string]time.Time
}

func (f *fakeFleet) Drain(_ context.Context, host string) (api.DrainResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "drain "+host)
	return api.DrainResult{Host: host}, nil
}

func (f *fakeFleet) Enable(_ context.Context, host string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "enable "+host)
	return nil
}

func (f *fakeFleet) Hosts() []api.Host {
	f.mu.Lock()
	defer f.mu.Unlock()
	var hs []api.Host
	for h, t := range f.beats {
		hs = append(hs, api.Host{Name: h, State: "up", LastHeartbeat: t})
	}
	return hs
}

func (f *fakeFleet) power(ctx context.Context, spec string) error {
	mac := strings.TrimPrefix(spec, "qmp:/fake/")
	m, err := f.reg.Machine(ctx, mac)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.calls = append(f.calls, "reset "+m.HostName)
	delete(f.beats, m.HostName) // down
	f.mu.Unlock()
	image := m.PinnedImage
	if image == f.broken {
		return nil // it never comes back
	}
	go func() {
		time.Sleep(20 * time.Millisecond)
		now := time.Now()
		f.reg.update(context.Background(), mac, func(m *api.BootMachine) error {
			m.Boots++
			m.LastImage, m.LastConfigAt = image, now
			return nil
		})
		f.mu.Lock()
		f.beats[m.HostName] = now.Add(time.Millisecond)
		f.mu.Unlock()
	}()
	return nil
}

func rolloutSetup(t *testing.T) (*Registry, *fakeFleet, *Roller, string, string, string) {
	t.Helper()
	reg := testRegistry(t)
	ctx := context.Background()
	a, b, broken := fakeImage(t, reg, "a"), fakeImage(t, reg, "b"), fakeImage(t, reg, "broken")
	if _, err := reg.SetProfile(ctx, api.BootProfile{Name: "default", Image: a}); err != nil {
		t.Fatal(err)
	}
	f := &fakeFleet{reg: reg, broken: broken, beats: map[string]time.Time{}}
	for i, h := range []string{"h1", "h2"} {
		mac := fmt.Sprintf("52:54:00:00:00:0%d", i+1)
		if _, err := reg.Admit(ctx, mac, api.BootAdmitRequest{Profile: "default", HostName: h}); err != nil {
			t.Fatal(err)
		}
		reg.update(ctx, mac, func(m *api.BootMachine) error { m.LastImage = a; m.Boots = 1; return nil })
		f.beats[h] = time.Now()
	}
	ro := &Roller{Reg: reg, Fleet: f, Power: f.power, Log: slog.New(slog.DiscardHandler), Poll: 5 * time.Millisecond}
	return reg, f, ro, a, b, broken
}

func TestRolloutOneHostAtATime(t *testing.T) {
	reg, f, ro, a, b, _ := rolloutSetup(t)
	ctx := context.Background()
	if _, err := reg.StartRollout(ctx, "default", api.BootRolloutRequest{Image: b}); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "power") {
		t.Fatalf("a rollout with machines that cannot be reset: %v", err)
	}
	for _, mac := range []string{"52:54:00:00:00:01", "52:54:00:00:00:02"} {
		if _, err := reg.SetPower(ctx, mac, "qmp:/fake/"+mac); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := reg.StartRollout(ctx, "default", api.BootRolloutRequest{Image: a}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a rollout to the image the profile has: %v", err)
	}
	if _, err := reg.StartRollout(ctx, "default", api.BootRolloutRequest{Image: b, TimeoutSeconds: 5}); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.StartRollout(ctx, "default", api.BootRolloutRequest{Image: b}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a second rollout while one runs: %v", err)
	}
	ro.RunPending(ctx)
	r, err := reg.Rollout(ctx, "default")
	if err != nil || r.State != api.RolloutSucceeded {
		t.Fatalf("rollout: %+v %v", r, err)
	}
	want := "drain h1,reset h1,enable h1,drain h2,reset h2,enable h2"
	if got := strings.Join(f.calls, ","); got != want {
		t.Fatalf("steps %s, want %s", got, want)
	}
	if p, _ := reg.Profile(ctx, "default"); p.Image != b {
		t.Fatalf("profile image %s after the rollout, want %s", p.Image, b)
	}
	for _, mac := range []string{"52:54:00:00:00:01", "52:54:00:00:00:02"} {
		if m, _ := reg.Machine(ctx, mac); m.PinnedImage != "" || m.LastImage != b {
			t.Fatalf("machine after the rollout: %+v", m)
		}
	}
}

func TestRolloutRollsBackABrokenImage(t *testing.T) {
	reg, f, ro, a, _, broken := rolloutSetup(t)
	ctx := context.Background()
	for _, mac := range []string{"52:54:00:00:00:01", "52:54:00:00:00:02"} {
		reg.SetPower(ctx, mac, "qmp:/fake/"+mac)
	}
	if _, err := reg.StartRollout(ctx, "default", api.BootRolloutRequest{Image: broken, TimeoutSeconds: 1}); err != nil {
		t.Fatal(err)
	}
	ro.RunPending(ctx)
	r, _ := reg.Rollout(ctx, "default")
	if r.State != api.RolloutRolledBack || r.Hosts[0].State != "rolled-back" || r.Hosts[1].State != "pending" || !strings.Contains(r.Message, "h1") {
		t.Fatalf("rollout of a broken image: %+v", r)
	}
	// h1 went back to the old image and was enabled; h2 was never touched.
	want := "drain h1,reset h1,drain h1,reset h1,enable h1"
	if got := strings.Join(f.calls, ","); got != want {
		t.Fatalf("steps %s, want %s", got, want)
	}
	if m, _ := reg.Machine(ctx, "52:54:00:00:00:01"); m.PinnedImage != "" || m.LastImage != a {
		t.Fatalf("h1 after the rollback: %+v", m)
	}
	if p, _ := reg.Profile(ctx, "default"); p.Image != a {
		t.Fatalf("profile image %s after a rolled-back rollout, want %s", p.Image, a)
	}
}
