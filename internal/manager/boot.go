package manager

import (
	"context"
	"errors"
	"net/http"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/bootsvc"
	"github.com/vigil-project/vigil/internal/pki"
)

// Stateless hosts: the boot registry (profiles, machines, host images) is
// served by every manager; the boot service itself (DHCP, iPXE, signed
// configurations) runs on a manager given a boot interface (runBoot).

// bootErr maps the boot registry's errors to the API's kinds.
func bootErr(err error) error {
	switch {
	case errors.Is(err, bootsvc.ErrInvalid):
		return wrapf(ErrInvalid, err, "boot")
	case errors.Is(err, bootsvc.ErrNotFound):
		return wrapf(ErrNotFound, err, "boot")
	case err != nil:
		return wrapf(ErrUnavailable, err, "boot")
	}
	return nil
}

func (m *Manager) bootRoutes(user func(pattern, role string, audited bool, h http.HandlerFunc)) {
	user("GET /v1/boot/images", RoleViewer, false, func(w http.ResponseWriter, r *http.Request) {
		imgs, err := m.boot.Images()
		m.answer(w, imgs, bootErr(err))
	})
	user("GET /v1/boot/profiles", RoleViewer, false, func(w http.ResponseWriter, r *http.Request) {
		ps, err := m.boot.Profiles(r.Context())
		m.answer(w, ps, bootErr(err))
	})
	user("PUT /v1/boot/profiles/{name}", RoleAdmin, true, func(w http.ResponseWriter, r *http.Request) {
		var p api.BootProfile
		if err := decodeBody(r, &p); err != nil {
			writeError(w, m.log, err)
			return
		}
		p.Name = r.PathValue("name")
		p, err := m.boot.SetProfile(r.Context(), p)
		m.answer(w, p, bootErr(err))
	})
	user("GET /v1/boot/machines", RoleViewer, false, func(w http.ResponseWriter, r *http.Request) {
		ms, err := m.boot.Machines(r.Context())
		m.answer(w, ms, bootErr(err))
	})
	user("POST /v1/boot/machines/{mac}/admit", RoleAdmin, true, func(w http.ResponseWriter, r *http.Request) {
		var req api.BootAdmitRequest
		if err := decodeBody(r, &req); err != nil {
			writeError(w, m.log, err)
			return
		}
		mach, err := m.boot.Admit(r.Context(), r.PathValue("mac"), req)
		m.answer(w, mach, bootErr(err))
	})
	user("POST /v1/boot/machines/{mac}/quarantine", RoleAdmin, true, func(w http.ResponseWriter, r *http.Request) {
		mach, err := m.boot.Quarantine(r.Context(), r.PathValue("mac"))
		m.answer(w, mach, bootErr(err))
	})
}

// answer writes v, or err.
func (m *Manager) answer(w http.ResponseWriter, v any, err error) {
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// runBoot runs the boot service on the configured interface until ctx
// ends. Hosts it configures get one-use join tokens bound to their names.
func (m *Manager) runBoot(ctx context.Context) {
	if m.identity == nil {
		m.log.Error("boot service not started: this manager has no cluster ca")
		return
	}
	srv, err := bootsvc.New(*m.bootCfg, m.boot, m.identity.CA, pki.ServerConfig(m.identity.Holder, nil, false), m, m.log)
	if err == nil {
		err = srv.Run(ctx)
	}
	if err != nil {
		m.log.Error("boot service stopped", "err", err)
	}
}
