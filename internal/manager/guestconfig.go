package manager

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/cloudinit"
	"github.com/vigil-project/vigil/internal/hostproto"
)

// Reconfigure changes what a VM's guest gets at its next boot: new
// cloud-init user-data (with a new instance id, so cloud-init applies it),
// or its installer ISO ejected (at once when it runs).
func (m *Manager) Reconfigure(ctx context.Context, name string, req api.VMConfigRequest) (api.VM, error) {
	if err := validName(name); err != nil {
		return api.VM{}, err
	}
	if req.UserData == nil && len(req.SSHKeys) == 0 && !req.Eject {
		return api.VM{}, errorf(ErrInvalid, "nothing to change: give user-data, ssh keys or eject")
	}
	if req.UserData != nil && len(req.SSHKeys) > 0 {
		return api.VM{}, errorf(ErrInvalid, "give user-data or ssh keys, not both: put the keys in the user-data")
	}
	var userData []byte
	switch {
	case len(req.SSHKeys) > 0:
		b, err := cloudinit.UserDataForSSHKeys(req.SSHKeys)
		if err != nil {
			return api.VM{}, wrapf(ErrInvalid, err, "ssh keys")
		}
		userData = b
	case req.UserData != nil && *req.UserData != "":
		userData = []byte(*req.UserData)
		if err := cloudinit.ValidateUserData(userData); err != nil {
			return api.VM{}, wrapf(ErrInvalid, err, "user-data")
		}
	}
	o, err := m.begin(ctx, name, opConfigure, func(o *vmOp) error {
		if (req.UserData != nil || len(req.SSHKeys) > 0) && o.r.Spec.CloudInit == nil {
			return errorf(ErrInvalid, "vm %s is not configured by cloud-init: only vms made from an image (--image) are", name)
		}
		if req.Eject && o.r.Spec.ISO == nil {
			return errorf(ErrInvalid, "vm %s has no cd-rom to eject: only vms made with --iso have one", name)
		}
		return nil
	})
	if err != nil {
		return api.VM{}, err
	}
	ctx, cancel := detach(ctx)
	defer cancel()
	defer o.end(ctx)
	hreq := hostproto.ConfigureRequest{VM: name, Eject: req.Eject}
	var ci *hostproto.CloudInit
	if o.r.Spec.CloudInit != nil && (req.UserData != nil || len(req.SSHKeys) > 0) {
		c := *o.r.Spec.CloudInit
		c.InstanceID, c.UserData = newUUID(), string(userData)
		ci, hreq.CloudInit = &c, &c
	}
	if _, err := hostproto.Configure.Call(ctx, m.hostNamed(o.r.Host), hreq); err != nil {
		return api.VM{}, fmt.Errorf("configure vm %s: %w", name, err)
	}
	if ci != nil {
		o.r.Spec.CloudInit = ci
	}
	if req.Eject {
		o.r.Spec.Ejected = true
	}
	msg := "cd-rom ejected"
	if ci != nil {
		msg = "cloud-init user-data replaced (instance " + ci.InstanceID + "): applied at the next boot"
	}
	o.publish(api.Event{Type: "vm.configured", VM: name, Host: o.r.Host, Message: msg})
	if err := o.release(ctx); err != nil {
		return api.VM{}, err
	}
	return m.view(o.r), nil
}

// Screenshot returns a PNG of a VM's display.
func (m *Manager) Screenshot(ctx context.Context, name string) ([]byte, error) {
	vm, err := m.Get(ctx, name)
	if err != nil {
		return nil, err
	}
	if vm.State != api.StateRunning && vm.State != api.StatePaused {
		return nil, errorf(ErrConflict, "vm %s is %s: only a running or paused vm has a screen", name, vm.State)
	}
	res, err := hostproto.Screenshot.Call(ctx, m.hostNamed(vm.Host), hostproto.VMRef{VM: name})
	if err != nil {
		return nil, fmt.Errorf("screenshot of vm %s: %w", name, err)
	}
	return res.PNG, nil
}

func (m *Manager) handleReconfigure(w http.ResponseWriter, r *http.Request) {
	var req api.VMConfigRequest
	if err := decodeBody(r, &req); err != nil {
		writeError(w, m.log, err)
		return
	}
	vm, err := m.Reconfigure(r.Context(), r.PathValue("name"), req)
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, vm)
}

func (m *Manager) handleScreenshot(w http.ResponseWriter, r *http.Request) {
	png, err := m.Screenshot(r.Context(), r.PathValue("name"))
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	w.Header().Set("Content-Type", "image/png")
	w.Write(png)
}

// handleVNC tunnels a client to the VM's VNC server: the client upgrades
// its connection (as with a host's tunnels) and the manager splices it to
// a tunnel it opens to the VM's host. The opening is audited at once; a
// session lasts as long as the client keeps it.
func (m *Manager) handleVNC(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	c := callerOf(r)
	e := api.AuditEntry{Time: time.Now(), Actor: c.String(), Role: c.Role, Action: r.Method + " " + r.URL.Path, VM: name,
		Status: http.StatusSwitchingProtocols, Remote: r.RemoteAddr}
	conn, err := m.openVNC(r.Context(), r, name)
	if err != nil {
		e.Status, _ = statusOf(err)
		e.Error = err.Error()
		m.audit(e)
		writeError(w, m.log, err)
		return
	}
	m.audit(e)
	defer conn.Close()
	hostproto.Splice(w, conn)
}

func (m *Manager) openVNC(ctx context.Context, r *http.Request, name string) (io.ReadWriteCloser, error) {
	if !hostproto.IsUpgrade(r) {
		return nil, errorf(ErrInvalid, "the vnc console is a tunnel: send \"Connection: Upgrade\" and \"Upgrade: %s\" (use 'vigil vm console --vnc')", hostproto.TunnelProtocol)
	}
	vm, err := m.Get(ctx, name)
	if err != nil {
		return nil, err
	}
	if vm.State != api.StateRunning && vm.State != api.StatePaused {
		return nil, errorf(ErrConflict, "vm %s is %s: only a running or paused vm has a screen", name, vm.State)
	}
	octx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := hostproto.VNC.Open(octx, m.hostNamed(vm.Host), hostproto.VMRef{VM: name})
	if err != nil {
		return nil, fmt.Errorf("vnc of vm %s: %w", name, err)
	}
	return conn, nil
}
