package manager

import (
	"context"
	"errors"
	"net/http"
	"time"

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
	user("GET /v1/boot/rules", RoleViewer, false, func(w http.ResponseWriter, r *http.Request) {
		rs, err := m.boot.Rules(r.Context())
		m.answer(w, rs, bootErr(err))
	})
	user("PUT /v1/boot/rules/{name}", RoleAdmin, true, func(w http.ResponseWriter, r *http.Request) {
		var rule api.BootRule
		if err := decodeBody(r, &rule); err != nil {
			writeError(w, m.log, err)
			return
		}
		rule.Name = r.PathValue("name")
		rule, err := m.boot.SetRule(r.Context(), rule)
		m.answer(w, rule, bootErr(err))
	})
	user("DELETE /v1/boot/rules/{name}", RoleAdmin, true, func(w http.ResponseWriter, r *http.Request) {
		if err := m.boot.DeleteRule(r.Context(), r.PathValue("name")); err != nil {
			writeError(w, m.log, bootErr(err))
			return
		}
		noteSuccess(r, http.StatusNoContent)
		w.WriteHeader(http.StatusNoContent)
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
	user("PUT /v1/boot/machines/{mac}/power", RoleAdmin, true, func(w http.ResponseWriter, r *http.Request) {
		var req api.BootPowerRequest
		if err := decodeBody(r, &req); err != nil {
			writeError(w, m.log, err)
			return
		}
		mach, err := m.boot.SetPower(r.Context(), r.PathValue("mac"), req.Power)
		m.answer(w, mach, bootErr(err))
	})
	user("POST /v1/boot/rollouts/{profile}", RoleAdmin, true, func(w http.ResponseWriter, r *http.Request) {
		var req api.BootRolloutRequest
		if err := decodeBody(r, &req); err != nil {
			writeError(w, m.log, err)
			return
		}
		ro, err := m.boot.StartRollout(r.Context(), r.PathValue("profile"), req)
		if err == nil {
			select { // the leader's rollout loop starts it now
			case m.rolloutKick <- struct{}{}:
			default:
			}
		}
		m.answer(w, ro, bootErr(err))
	})
	user("GET /v1/boot/rollouts/{profile}", RoleViewer, false, func(w http.ResponseWriter, r *http.Request) {
		ro, err := m.boot.Rollout(r.Context(), r.PathValue("profile"))
		m.answer(w, ro, bootErr(err))
	})
	user("POST /v1/boot/machines/{mac}/quarantine", RoleAdmin, true, func(w http.ResponseWriter, r *http.Request) {
		mach, err := m.boot.Quarantine(r.Context(), r.PathValue("mac"))
		if err == nil && mach.LastTokenID != "" {
			m.RevokeJoinToken(r.Context(), mach.LastTokenID)
		}
		m.answer(w, mach, bootErr(err))
	})
	user("DELETE /v1/boot/machines/{mac}", RoleAdmin, true, func(w http.ResponseWriter, r *http.Request) {
		if mach, err := m.boot.Machine(r.Context(), r.PathValue("mac")); err == nil && mach.LastTokenID != "" {
			m.RevokeJoinToken(r.Context(), mach.LastTokenID)
		}
		if err := m.boot.Forget(r.Context(), r.PathValue("mac")); err != nil {
			writeError(w, m.log, bootErr(err))
			return
		}
		noteSuccess(r, http.StatusNoContent)
		w.WriteHeader(http.StatusNoContent)
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
	bootsvc.Serve(ctx, *m.bootCfg, m.boot, m.identity.CA, pki.ServerConfig(m.identity.Holder, nil, false), m, m.log)
}

// runRollouts runs host image rollouts while this manager leads: on a
// kick (a rollout was started here) or every few seconds (one started on
// another manager, or left by a leader that died).
func (m *Manager) runRollouts(ctx context.Context) {
	ro := &bootsvc.Roller{Reg: m.boot, Fleet: m, Power: bootsvc.QMPPower, Log: m.log}
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-m.rolloutKick:
		}
		if m.leader.Load() {
			ro.RunPending(ctx)
		}
	}
}

// RevokeJoinToken deletes join token id unless a host already joined with
// it.
func (m *Manager) RevokeJoinToken(ctx context.Context, id string) error {
	return JoinTokens{Store: m.store}.RevokeJoinToken(ctx, id)
}
