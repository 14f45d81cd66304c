package hostagent

import (
	"context"
	"fmt"
	"strconv"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/guestproto"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// request sends m to the guest agent and waits for the answer with its ID.
func (v *vm) request(ctx context.Context, m guestproto.Message) (guestproto.Message, error) {
	v.mu.Lock()
	enc := v.guestEnc
	if enc == nil {
		v.mu.Unlock()
		return m, fmt.Errorf("%s: %w", v.spec.Name, ErrNoGuestAgent)
	}
	if v.pending == nil {
		v.pending = map[string]chan guestproto.Message{}
	}
	v.nextID++
	m.ID = "h" + strconv.FormatUint(v.nextID, 10)
	ch := make(chan guestproto.Message, 1)
	v.pending[m.ID] = ch
	v.mu.Unlock()
	defer func() {
		v.mu.Lock()
		delete(v.pending, m.ID)
		v.mu.Unlock()
	}()
	// The write can block while the guest is not reading; the context
	// bounds the wait for the answer, which is what callers care about.
	errc := make(chan error, 1)
	go func() { errc <- enc.Encode(m) }()
	select {
	case err := <-errc:
		if err != nil {
			return m, fmt.Errorf("send to guest agent of %s: %w", v.spec.Name, err)
		}
	case <-ctx.Done():
		return m, fmt.Errorf("send to guest agent of %s: %w", v.spec.Name, ctx.Err())
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return m, fmt.Errorf("%s: %w (lost while waiting)", v.spec.Name, ErrNoGuestAgent)
		}
		return r, nil
	case <-ctx.Done():
		return m, fmt.Errorf("wait for guest agent of %s: %w", v.spec.Name, ctx.Err())
	}
}

// Exec runs a shell command in the guest through its agent.
func (a *Agent) Exec(ctx context.Context, r hostproto.ExecRequest) (api.ExecResult, error) {
	name, req := r.VM, r.Exec
	v, err := a.get(name)
	if err != nil {
		return api.ExecResult{}, err
	}
	e := guestproto.Exec{Command: req.Command, TimeoutSeconds: req.TimeoutSeconds, Background: req.Background}
	m, err := v.request(ctx, guestproto.Message{Type: guestproto.TypeExec, Exec: &e})
	if err != nil {
		return api.ExecResult{}, err
	}
	if m.ExecResult == nil {
		return api.ExecResult{}, fmt.Errorf("guest agent of %s sent an empty exec result", name)
	}
	x := m.ExecResult
	return api.ExecResult{ExitCode: x.ExitCode, Output: x.Output, Truncated: x.Truncated, Error: x.Error}, nil
}
