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
	"github.com/vigil-project/vigil/internal/pki"
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
	if m.State == api.MachineAdmitted && m.PinnedImage != "" {
		return m.PinnedImage, nil
	}
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
	q := r.URL.Query()
	if q.Get("smbios") == "" {
		// First ask iPXE what the machine says it is (SMBIOS, for the
		// boot rules): the DHCP answer's URL cannot carry its settings,
		// a script can.
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "#!ipxe\nchain http://%s/boot.ipxe?mac=%s&smbios=1&uuid=${uuid}&vendor=${manufacturer:uristring}&product=${product:uristring}\n", r.Host, mac)
		return
	}
	m, err := s.reg.seen(r.Context(), mac, Claims{UUID: q.Get("uuid"), Vendor: q.Get("vendor"), Product: q.Get("product"), IP: remoteIP(r)})
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
	fmt.Fprintf(w, "#!ipxe\nkernel %s/vmlinuz?mac=%s console=ttyS0 loglevel=4 vigil.boot=https://%s vigil.bootmac=%s vigil.image=%s vigil.kernel=%s/vmlinuz\ninitrd %s/initrd.img?mac=%s\nboot\n",
		base, mac, s.tlsAddr, mac, digest, base, base, mac)
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
	if len(req.UUID) > 64 || len(req.Image) > 80 || len(req.Error) > 4096 || len(req.Nonce) > 128 || len(req.Vendor) > 64 || len(req.Product) > 64 {
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
	m, err := s.reg.seen(ctx, req.MAC, Claims{UUID: req.UUID, Vendor: req.Vendor, Product: req.Product, IP: remoteIP(r)})
	if err != nil {
		writeJSONError(w, http.StatusServiceUnavailable, "boot service unavailable")
		return
	}
	if m.State != api.MachineAdmitted {
		s.log.Warn("boot: quarantined machine asked for its configuration", "mac", m.MAC, "ip", remoteIP(r))
		writeJSONError(w, http.StatusForbidden, fmt.Sprintf("machine %s is quarantined: admit it with 'vigil boot admit %s --profile PROFILE --host-name NAME'", m.MAC, m.MAC))
		return
	}
	if len(req.Nonce) < 16 {
		writeJSONError(w, http.StatusBadRequest, "bad request: a nonce of at least 16 characters is needed (an older host image?)")
		return
	}
	signed, err := s.configFor(ctx, m, req)
	if errors.Is(err, errTooSoon) {
		writeJSONError(w, http.StatusTooManyRequests, err.Error())
		return
	}
	if err != nil {
		s.log.Error("boot: make configuration", "mac", m.MAC, "err", err)
		writeJSONError(w, http.StatusServiceUnavailable, "no configuration: "+err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(signed)
}

// configEvery is the least time between two configurations of a machine:
// each mints a join token, so a host stuck asking cannot pile them up.
const configEvery = 10 * time.Second

// errTooSoon is a configuration asked for within configEvery of the last.
var errTooSoon = errors.New("a configuration was issued a moment ago: ask again in a few seconds")

// configFor signs machine m's configuration with a fresh one-use join
// token bound to its host name, records it as m's last, and revokes the
// token of the one before (unused, it admits nothing any more).
func (s *Server) configFor(ctx context.Context, m api.BootMachine, req boothost.Request) (bootconfig.Signed, error) {
	if s.reg.now().Sub(m.LastConfigAt) < configEvery {
		return bootconfig.Signed{}, errTooSoon
	}
	p, err := s.reg.Profile(ctx, m.Profile)
	if err != nil {
		return bootconfig.Signed{}, err
	}
	tok, err := s.cluster.JoinToken(ctx, m.HostName)
	if err != nil {
		return bootconfig.Signed{}, err
	}
	tokenID := ""
	if t, err := pki.ParseJoinToken(tok.Token); err == nil {
		tokenID = t.ID
	}
	now := s.reg.now()
	image := p.Image
	if m.PinnedImage != "" {
		image = m.PinnedImage
	}
	signed, err := bootconfig.Sign(s.ca, bootconfig.Config{MAC: m.MAC, UUID: m.UUID, HostName: m.HostName,
		Managers: s.managerURLs, JoinToken: tok.Token, Image: image, Profile: p.Name, Nonce: req.Nonce,
		StoragePool: p.StoragePool, Labels: p.Labels, IssuedAt: now, Expires: now.Add(configTTL)})
	if err != nil {
		return bootconfig.Signed{}, err
	}
	previous := ""
	if _, err := s.reg.update(ctx, m.MAC, func(cur *api.BootMachine) error {
		// Still admitted under the same name (not quarantined or renamed
		// since it was read)?
		if cur.State != api.MachineAdmitted || cur.HostName != m.HostName {
			return fmt.Errorf("machine %s changed while its configuration was made: ask again", m.MAC)
		}
		previous = cur.LastTokenID
		cur.Boots++
		cur.LastConfig, cur.LastConfigAt, cur.LastImage, cur.LastTokenID = signed.Digest(), now, req.Image, tokenID
		if cur.LastBoot != nil && cur.LastBoot.Configured.IsZero() {
			cur.LastBoot.Configured = now
		}
		return nil
	}); err != nil {
		s.cluster.RevokeJoinToken(ctx, tokenID)
		return bootconfig.Signed{}, err
	}
	if previous != "" {
		s.cluster.RevokeJoinToken(ctx, previous)
	}
	s.log.Info("boot: configuration sent", "mac", m.MAC, "host", m.HostName, "profile", p.Name, "config", signed.Digest())
	return signed, nil
}

// reportEvery is the least time between two recorded reports of a machine.
const reportEvery = 10 * time.Second

func (s *Server) handleReport(w http.ResponseWriter, r *http.Request) {
	req, err := decodeRequest(r)
	if err != nil {
		writeJSONError(w, http.StatusBadRequest, err.Error())
		return
	}
	// Only admitted machines report (only they are sent configurations):
	// nobody makes or grows records by posting reports.
	m, err := s.reg.Machine(r.Context(), req.MAC)
	if err != nil || m.State != api.MachineAdmitted {
		writeJSONError(w, http.StatusNotFound, "unknown machine")
		return
	}
	if s.reg.now().Sub(m.LastErrorAt) < reportEvery {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	problem := req.Error
	if len(problem) > 500 {
		problem = problem[:500] + "..."
	}
	s.log.Warn("boot: a machine refused its configuration", "mac", req.MAC, "problem", problem)
	if _, err := s.reg.update(r.Context(), req.MAC, func(m *api.BootMachine) error {
		m.LastError, m.LastErrorAt = problem, s.reg.now()
		return nil
	}); err != nil {
		writeJSONError(w, http.StatusServiceUnavailable, "boot service unavailable")
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
