package bootsvc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/bootconfig"
	"github.com/vigil-project/vigil/internal/boothost"
	"github.com/vigil-project/vigil/internal/hostimage"
)

// configTTL is how long a signed configuration (and the join token in it)
// stays valid: long enough for a slow boot to join.
const configTTL = 15 * time.Minute

var hexRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// bootHandler serves iPXE over plain HTTP: the script and image files. It
// hands out nothing secret: images are the same for every machine, and
// the script only says where to get them and the configuration.
func (s *Server) bootHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /boot.ipxe", s.handleScript)
	mux.HandleFunc("GET /images/{hex}/{file}", s.handleImageFile)
	return mux
}

// tlsHandler serves booted hosts over TLS: configurations and reports.
func (s *Server) tlsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+boothost.ConfigPath, s.handleConfig)
	mux.HandleFunc("POST "+boothost.ReportPath, s.handleReport)
	return mux
}

func remoteIP(r *http.Request) string {
	host, _, _ := net.SplitHostPort(r.RemoteAddr)
	return host
}

// imageFor is the host image machine m boots: its profile's once admitted,
// else the default profile's, else the newest image.
func (s *Server) imageFor(ctx context.Context, m api.BootMachine) (string, error) {
	if m.State == api.MachineAdmitted {
		if p, err := s.reg.Profile(ctx, m.Profile); err == nil {
			return p.Image, nil
		}
	}
	if p, err := s.reg.Profile(ctx, "default"); err == nil {
		return p.Image, nil
	}
	imgs, err := s.reg.Images()
	if err != nil || len(imgs) == 0 {
		return "", errors.New("no host image on this manager: build one with 'vigil boot image build'")
	}
	return imgs[0].Digest, nil
}

func (s *Server) handleScript(w http.ResponseWriter, r *http.Request) {
	mac, err := NormalMAC(r.URL.Query().Get("mac"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	m, err := s.reg.seen(r.Context(), mac, r.URL.Query().Get("uuid"), remoteIP(r))
	if err != nil {
		s.log.Error("boot: record machine", "mac", mac, "err", err)
		http.Error(w, "boot service unavailable", http.StatusServiceUnavailable)
		return
	}
	digest, err := s.imageFor(r.Context(), m)
	if err != nil {
		s.log.Warn("boot: no image for machine", "mac", mac, "err", err)
		// iPXE shows the message and tries again later.
		fmt.Fprintf(w, "#!ipxe\necho vigil: %s\nsleep 30\nreboot\n", err)
		return
	}
	s.log.Info("boot: machine booting", "mac", mac, "state", m.State, "image", digest, "ip", remoteIP(r))
	s.reg.stage(r.Context(), mac, func(b *api.BootStages, now time.Time) { b.Script = now })
	hex := strings.TrimPrefix(digest, "sha256:")
	base := "http://" + r.Host + "/images/" + hex
	w.Header().Set("Content-Type", "text/plain")
	fmt.Fprintf(w, "#!ipxe\nkernel %s/vmlinuz?mac=%s console=ttyS0 loglevel=4 vigil.boot=https://%s vigil.bootmac=%s vigil.image=%s\ninitrd %s/initrd.img?mac=%s\nboot\n",
		base, mac, s.tlsAddr, mac, digest, base, mac)
}

func (s *Server) handleImageFile(w http.ResponseWriter, r *http.Request) {
	hex, file := r.PathValue("hex"), r.PathValue("file")
	if !hexRE.MatchString(hex) || (file != "vmlinuz" && file != "initrd.img") {
		http.NotFound(w, r)
		return
	}
	img, err := hostimage.Load(hostimage.Path(s.reg.ImagesDir, "sha256:"+hex))
	if err != nil {
		http.NotFound(w, r)
		return
	}
	http.ServeFile(w, r, filepath.Join(img.Dir, file))
	if file == "initrd.img" && r.Header.Get("Range") == "" {
		if mac, err := NormalMAC(r.URL.Query().Get("mac")); err == nil {
			s.reg.stage(r.Context(), mac, func(b *api.BootStages, now time.Time) { b.Loaded = now })
		}
	}
}

func writeJSONError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

// decodeRequest reads a host's request: small, known fields only.
func decodeRequest(r *http.Request) (boothost.Request, error) {
	var req boothost.Request
	dec := json.NewDecoder(io.LimitReader(r.Body, 8<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return req, fmt.Errorf("%w: bad request: %v", ErrInvalid, err)
	}
	mac, err := NormalMAC(req.MAC)
	if err != nil {
		return req, err
	}
	req.MAC = mac
	if len(req.UUID) > 64 || len(req.Image) > 80 || len(req.Error) > 4096 {
		return req, fmt.Errorf("%w: a field is too long", ErrInvalid)
	}
	return req, nil
}

func (s *Server) handleConfig(w http.ResponseWriter, r *http.Request) {
	req, err := decodeRequest(r)
	if err != nil {
		writeJSONError(w, http.StatusBadRequest, err.Error())
		return
	}
	ctx := r.Context()
	m, err := s.reg.seen(ctx, req.MAC, req.UUID, remoteIP(r))
	if err != nil {
		writeJSONError(w, http.StatusServiceUnavailable, "boot service unavailable")
		return
	}
	if m.State != api.MachineAdmitted {
		s.log.Warn("boot: quarantined machine asked for its configuration", "mac", m.MAC, "ip", remoteIP(r))
		writeJSONError(w, http.StatusForbidden, fmt.Sprintf("machine %s is quarantined: admit it with 'vigil boot admit %s --profile PROFILE --host-name NAME'", m.MAC, m.MAC))
		return
	}
	signed, err := s.configFor(ctx, m, req)
	if err != nil {
		s.log.Error("boot: make configuration", "mac", m.MAC, "err", err)
		writeJSONError(w, http.StatusServiceUnavailable, "no configuration: "+err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(signed)
}

// configFor signs machine m's configuration with a fresh one-use join
// token bound to its host name, and records it as m's last.
func (s *Server) configFor(ctx context.Context, m api.BootMachine, req boothost.Request) (bootconfig.Signed, error) {
	p, err := s.reg.Profile(ctx, m.Profile)
	if err != nil {
		return bootconfig.Signed{}, err
	}
	tok, err := s.cluster.JoinToken(ctx, m.HostName)
	if err != nil {
		return bootconfig.Signed{}, err
	}
	now := s.reg.now()
	signed, err := bootconfig.Sign(s.ca, bootconfig.Config{MAC: m.MAC, UUID: m.UUID, HostName: m.HostName,
		Managers: s.managerURLs, JoinToken: tok.Token, Image: p.Image, Profile: p.Name,
		StoragePool: p.StoragePool, Labels: p.Labels, IssuedAt: now, Expires: now.Add(configTTL)})
	if err != nil {
		return bootconfig.Signed{}, err
	}
	if _, err := s.reg.update(ctx, m.MAC, func(m *api.BootMachine) error {
		m.Boots++
		m.LastConfig, m.LastConfigAt, m.LastImage = signed.Digest(), now, req.Image
		if m.LastBoot != nil && m.LastBoot.Configured.IsZero() {
			m.LastBoot.Configured = now
		}
		return nil
	}); err != nil {
		return bootconfig.Signed{}, err
	}
	s.log.Info("boot: configuration sent", "mac", m.MAC, "host", m.HostName, "profile", p.Name, "config", signed.Digest())
	return signed, nil
}

func (s *Server) handleReport(w http.ResponseWriter, r *http.Request) {
	req, err := decodeRequest(r)
	if err != nil {
		writeJSONError(w, http.StatusBadRequest, err.Error())
		return
	}
	// Only machines that booted from here report: nobody makes records
	// by posting reports.
	if _, err := s.reg.Machine(r.Context(), req.MAC); err != nil {
		writeJSONError(w, http.StatusNotFound, "unknown machine")
		return
	}
	s.log.Error("boot: a machine refused its configuration", "mac", req.MAC, "problem", req.Error)
	if _, err := s.reg.update(r.Context(), req.MAC, func(m *api.BootMachine) error {
		m.LastError, m.LastErrorAt = req.Error, s.reg.now()
		return nil
	}); err != nil {
		writeJSONError(w, http.StatusServiceUnavailable, "boot service unavailable")
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
