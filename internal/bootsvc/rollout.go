package bootsvc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/qemu/qmp"
	"github.com/vigil-project/vigil/internal/store"
)

// A rollout moves the hosts of a profile to a new image, one host at a
// time: the machine is pinned to the new image, its host drained (its VMs
// migrate live), the machine reset, and the rollout waits until the host
// is back, registered, having booted the new image. Then the host is
// enabled and the next one goes. A host not back and healthy within the
// timeout is pinned to its previous image and reset again, and the
// rollout stops there, rolled back: no other host has taken the image.
// When every host has it, the profile names the new image and the pins go.
//
// The record (boot/rollouts/PROFILE) is written after every step; the
// leading manager runs it, and a new leader takes up a running one where
// the record says (a host's step is repeated from its start).

// DefaultRolloutTimeout is how long a rebooted host has to come back.
const DefaultRolloutTimeout = 10 * time.Minute

func rolloutKey(profile string) string { return "boot/rollouts/" + profile }

// SetPower records how the manager resets machine mac.
func (r *Registry) SetPower(ctx context.Context, mac, power string) (api.BootMachine, error) {
	if power != "" && !strings.HasPrefix(power, "qmp:/") {
		return api.BootMachine{}, fmt.Errorf("%w: power %q: give qmp:/PATH/TO/SOCKET (a QEMU machine's monitor); IPMI and Redfish are not supported yet", ErrInvalid, power)
	}
	if _, err := r.Machine(ctx, mac); err != nil {
		return api.BootMachine{}, err
	}
	return r.update(ctx, mac, func(m *api.BootMachine) error {
		m.Power = power
		return nil
	})
}

// StartRollout records a rollout of profile to image; the leader runs it.
func (r *Registry) StartRollout(ctx context.Context, profile string, req api.BootRolloutRequest) (api.BootRollout, error) {
	p, err := r.Profile(ctx, profile)
	if err != nil {
		return api.BootRollout{}, err
	}
	if _, err := r.image(req.Image); err != nil {
		return api.BootRollout{}, err
	}
	if req.Image == p.Image {
		return api.BootRollout{}, fmt.Errorf("%w: profile %s already boots %s", ErrInvalid, profile, req.Image)
	}
	if req.TimeoutSeconds < 0 {
		return api.BootRollout{}, fmt.Errorf("%w: negative timeout", ErrInvalid)
	}
	timeout := req.TimeoutSeconds
	if timeout == 0 {
		timeout = int(DefaultRolloutTimeout / time.Second)
	}
	ms, err := r.Machines(ctx)
	if err != nil {
		return api.BootRollout{}, err
	}
	ro := api.BootRollout{Profile: profile, From: p.Image, To: req.Image, State: api.RolloutRunning, Timeout: timeout, Started: r.now()}
	for _, m := range ms {
		if m.State != api.MachineAdmitted || m.Profile != profile {
			continue
		}
		if m.Power == "" {
			return api.BootRollout{}, fmt.Errorf("%w: machine %s (host %s) has no power control: set it with 'vigil boot power %s --qmp SOCKET'", ErrInvalid, m.MAC, m.HostName, m.MAC)
		}
		ro.Hosts = append(ro.Hosts, api.BootRolloutHost{Host: m.HostName, MAC: m.MAC, State: "pending"})
	}
	sort.Slice(ro.Hosts, func(i, j int) bool { return ro.Hosts[i].Host < ro.Hosts[j].Host })
	var old api.BootRollout
	if _, err := r.Store.Get(ctx, rolloutKey(profile), &old); err == nil && old.State == api.RolloutRunning {
		return api.BootRollout{}, fmt.Errorf("%w: a rollout of profile %s is running (to %s)", ErrInvalid, profile, old.To)
	}
	if err := r.Store.Put(ctx, rolloutKey(profile), ro); err != nil {
		return api.BootRollout{}, err
	}
	return ro, nil
}

// Rollout reads profile's last rollout.
func (r *Registry) Rollout(ctx context.Context, profile string) (api.BootRollout, error) {
	var ro api.BootRollout
	if _, err := r.Store.Get(ctx, rolloutKey(profile), &ro); errors.Is(err, store.ErrNotFound) {
		return ro, fmt.Errorf("%w: no rollout of profile %s", ErrNotFound, profile)
	} else if err != nil {
		return ro, err
	}
	return ro, nil
}

// running lists the rollouts in progress.
func (r *Registry) running(ctx context.Context) ([]api.BootRollout, error) {
	kvs, err := r.Store.List(ctx, "boot/rollouts/")
	if err != nil {
		return nil, err
	}
	var out []api.BootRollout
	for _, kv := range kvs {
		var ro api.BootRollout
		if json.Unmarshal(kv.Value, &ro) == nil && ro.State == api.RolloutRunning {
			out = append(out, ro)
		}
	}
	return out, nil
}

// Fleet is what a rollout needs of the manager.
type Fleet interface {
	Drain(ctx context.Context, host string) (api.DrainResult, error)
	Enable(ctx context.Context, host string) error
	Hosts() []api.Host
}

// Power resets a machine.
type Power func(ctx context.Context, spec string) error

// QMPPower resets a QEMU machine through its monitor socket (qmp:PATH).
func QMPPower(ctx context.Context, spec string) error {
	path, ok := strings.CutPrefix(spec, "qmp:")
	if !ok {
		return fmt.Errorf("unsupported power control %q", spec)
	}
	mon, err := qmp.Dial(ctx, path)
	if err != nil {
		return fmt.Errorf("power control %s: %w", spec, err)
	}
	defer mon.Close()
	return mon.Run(ctx, "system_reset", nil, nil)
}

// Roller runs rollouts.
type Roller struct {
	Reg   *Registry
	Fleet Fleet
	Power Power
	Log   *slog.Logger
	// Poll is how often it looks at a rebooting host (default 1 s).
	Poll time.Duration
}

// RunPending runs every rollout in progress to its end (or until ctx
// ends); the leading manager calls it.
func (ro *Roller) RunPending(ctx context.Context) {
	rs, err := ro.Reg.running(ctx)
	if err != nil {
		return
	}
	for _, r := range rs {
		if err := ro.run(ctx, r); err != nil && ctx.Err() == nil {
			ro.Log.Error("boot rollout", "profile", r.Profile, "err", err)
		}
	}
}

func (ro *Roller) save(ctx context.Context, r *api.BootRollout) error {
	return ro.Reg.Store.Put(context.WithoutCancel(ctx), rolloutKey(r.Profile), r)
}

func (ro *Roller) pin(ctx context.Context, mac, image string) error {
	_, err := ro.Reg.update(ctx, mac, func(m *api.BootMachine) error {
		m.PinnedImage = image
		return nil
	})
	return err
}

func (ro *Roller) run(ctx context.Context, r api.BootRollout) error {
	ro.Log.Info("boot rollout", "profile", r.Profile, "from", r.From, "to", r.To, "hosts", len(r.Hosts))
	for i := range r.Hosts {
		h := &r.Hosts[i]
		if h.State == "done" {
			continue
		}
		h.State, h.Started, h.Error = "draining", ro.Reg.now(), ""
		if err := ro.save(ctx, &r); err != nil {
			return err
		}
		err := ro.upgrade(ctx, &r, h, r.To)
		if ctx.Err() != nil {
			return ctx.Err() // the next leader takes it up
		}
		if err == nil {
			h.State, h.Finished = "done", ro.Reg.now()
			if err := ro.save(ctx, &r); err != nil {
				return err
			}
			continue
		}
		// Back to what it ran, and stop.
		ro.Log.Error("boot rollout: host not back on the new image, rolling it back", "profile", r.Profile, "host", h.Host, "err", err)
		h.Error = err.Error()
		back := ro.upgrade(ctx, &r, h, r.From)
		h.State, h.Finished = "rolled-back", ro.Reg.now()
		r.State, r.Finished = api.RolloutRolledBack, ro.Reg.now()
		r.Message = fmt.Sprintf("host %s did not come back healthy on %s (%v): it was put back on %s", h.Host, r.To, err, r.From)
		if back != nil {
			r.Message += fmt.Sprintf(", and did not come back on that either: %v", back)
		} else {
			ro.pin(ctx, h.MAC, "") // the profile's image again
		}
		if i > 0 {
			r.Message += fmt.Sprintf("; the %d host(s) moved before it keep %s", i, r.To)
		}
		return ro.save(ctx, &r)
	}
	// Every host runs the new image: the profile names it, the pins go.
	p, err := ro.Reg.Profile(ctx, r.Profile)
	if err != nil {
		return err
	}
	p.Image = r.To
	if _, err := ro.Reg.SetProfile(ctx, p); err != nil {
		return err
	}
	for _, h := range r.Hosts {
		ro.pin(ctx, h.MAC, "")
	}
	r.State, r.Finished = api.RolloutSucceeded, ro.Reg.now()
	ro.Log.Info("boot rollout done", "profile", r.Profile, "image", r.To)
	return ro.save(ctx, &r)
}

// upgrade moves host h to image: pin, drain, reset, wait until it is back
// on that image and registered, enable.
func (ro *Roller) upgrade(ctx context.Context, r *api.BootRollout, h *api.BootRolloutHost, image string) error {
	m, err := ro.Reg.Machine(ctx, h.MAC)
	if err != nil {
		return err
	}
	if err := ro.pin(ctx, h.MAC, image); err != nil {
		return err
	}
	if _, err := ro.Fleet.Drain(ctx, h.Host); err != nil {
		return fmt.Errorf("drain %s: %w", h.Host, err)
	}
	h.State = "rebooting"
	ro.save(ctx, r)
	before := m.Boots
	reset := time.Now()
	if err := ro.Power(ctx, m.Power); err != nil {
		return fmt.Errorf("reset machine %s: %w", h.MAC, err)
	}
	poll := ro.Poll
	if poll == 0 {
		poll = time.Second
	}
	deadline := reset.Add(time.Duration(r.Timeout) * time.Second)
	for {
		if m, err := ro.Reg.Machine(ctx, h.MAC); err == nil && m.Boots > before && m.LastImage == image && ro.up(h.Host, m.LastConfigAt) {
			return ro.Fleet.Enable(ctx, h.Host)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not back on %s within %s", image, time.Duration(r.Timeout)*time.Second)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(poll):
		}
	}
}

// up tells whether host is registered and heartbeating since its
// configuration was sent.
func (ro *Roller) up(host string, since time.Time) bool {
	for _, h := range ro.Fleet.Hosts() {
		if h.Name == host {
			return h.State == "up" && h.LastHeartbeat.After(since)
		}
	}
	return false
}
