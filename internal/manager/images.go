package manager

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/hostproto"
	"github.com/vigil-project/vigil/internal/imagestore"
	"github.com/vigil-project/vigil/internal/pki"
	"github.com/vigil-project/vigil/internal/store"
)

// Images. A user imports an image through any manager, which checks it and
// keeps it in its blob store (by content); its record ("images/<name>")
// names the blob. Every manager keeps a copy of every image: each one
// looks every imageSync for images it lacks and fetches them from a
// manager that has one (over mutual TLS with the managers' certificates),
// and advertises what it holds under "imageholders/<digest>/<manager>",
// bound to its lease. So an image survives the loss of any manager, and any
// manager serves any image to a host (GET /v1/images/blobs/<digest>).
// Hosts keep the blobs their VMs use: in their storage pool (shared by
// the pool's hosts) or a local cache.

// MaxImageBytes bounds an import.
const MaxImageBytes = 64 << 30

// imageSync is how often a manager looks for images it lacks.
const imageSync = 10 * time.Second

type imageRecord struct {
	Name        string    `json:"name"`
	Digest      string    `json:"digest"`
	Format      string    `json:"format"`
	VirtualSize int64     `json:"virtual_size"`
	FileSize    int64     `json:"file_size"`
	Created     time.Time `json:"created"`
	CreatedBy   string    `json:"created_by,omitempty"`
}

func imageKey(name string) string { return "images/" + name }

// managerRecord says where a manager's API is, for the other managers.
type managerRecord struct {
	Name string `json:"name"`
	URL  string `json:"url"`
}

// ImportImage checks and stores an image read from r under name.
func (m *Manager) ImportImage(ctx context.Context, name string, r io.Reader, by string) (api.Image, error) {
	if m.images == nil {
		return api.Image{}, errorf(ErrUnavailable, "this manager keeps no images")
	}
	if !dnsLabel.MatchString(name) {
		return api.Image{}, errorf(ErrInvalid, "invalid image name %q: it must be a DNS label", name)
	}
	if _, err := m.image(ctx, name); err == nil {
		return api.Image{}, errorf(ErrConflict, "an image named %s exists: delete it first, or pick another name", name)
	}
	info, err := m.images.Import(ctx, r, MaxImageBytes)
	switch {
	case errors.Is(err, imagestore.ErrNotImage), errors.Is(err, imagestore.ErrBacking), errors.Is(err, imagestore.ErrCorrupt),
		errors.Is(err, imagestore.ErrTooLarge):
		return api.Image{}, wrapf(ErrInvalid, err, "image %s refused", name)
	case err != nil:
		return api.Image{}, wrapf(ErrUnavailable, err, "import image %s", name)
	}
	rec := imageRecord{Name: name, Digest: info.Digest, Format: info.Format, VirtualSize: info.VirtualSize, FileSize: info.FileSize,
		Created: time.Now().UTC(), CreatedBy: by}
	if _, err := m.store.Create(ctx, imageKey(name), rec); err != nil {
		if errors.Is(err, store.ErrExists) {
			return api.Image{}, errorf(ErrConflict, "an image named %s exists: delete it first, or pick another name", name)
		}
		return api.Image{}, wrapf(ErrUnavailable, err, "record image %s", name)
	}
	m.advertise(ctx, info.Digest)
	m.publish(api.Event{Type: "image.imported", Message: fmt.Sprintf("%s %s %s, %d MiB", name, info.Format, info.Digest, info.FileSize>>20)})
	return rec.view(nil), nil
}

func (r imageRecord) view(vms []string) api.Image {
	if vms == nil {
		vms = []string{}
	}
	return api.Image{Name: r.Name, Digest: r.Digest, Format: r.Format, VirtualSize: r.VirtualSize, FileSize: r.FileSize, Created: r.Created, VMs: vms}
}

func (m *Manager) image(ctx context.Context, name string) (imageRecord, error) {
	var r imageRecord
	_, err := m.store.Get(ctx, imageKey(name), &r)
	if errors.Is(err, store.ErrNotFound) {
		return r, errorf(ErrNotFound, "no image named %s: see 'vigil image list'", name)
	}
	if err != nil {
		return r, wrapf(ErrUnavailable, err, "read image %s", name)
	}
	return r, nil
}

func (m *Manager) imageRecords(ctx context.Context) ([]imageRecord, error) {
	kvs, err := m.store.List(ctx, "images/")
	if err != nil {
		return nil, wrapf(ErrUnavailable, err, "list images")
	}
	var out []imageRecord
	for _, kv := range kvs {
		var r imageRecord
		if json.Unmarshal(kv.Value, &r) == nil {
			out = append(out, r)
		}
	}
	return out, nil
}

// usersOf maps a digest to the VMs made from it: from the record mirror
// once it holds every change the store acknowledged, else the store.
func (m *Manager) usersOf(ctx context.Context) (map[string][]string, error) {
	rs, ok := m.consistentRecords(ctx)
	if !ok {
		var err error
		if rs, err = m.records(ctx); err != nil {
			return nil, err
		}
	}
	out := map[string][]string{}
	for _, s := range rs {
		for _, ref := range []*hostproto.ImageRef{s.rec.Spec.Image, s.rec.Spec.ISO} {
			if ref != nil {
				out[ref.Digest] = append(out[ref.Digest], s.rec.Spec.Name)
			}
		}
	}
	return out, nil
}

// Images lists the images, by name, with the VMs using each.
func (m *Manager) Images(ctx context.Context) ([]api.Image, error) {
	recs, err := m.imageRecords(ctx)
	if err != nil {
		return nil, err
	}
	users, err := m.usersOf(ctx)
	if err != nil {
		return nil, err
	}
	out := []api.Image{}
	for _, r := range recs {
		out = append(out, r.view(users[r.Digest]))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// DeleteImage removes an image no VM uses. Its blob goes from the managers
// once no image record names it (a VM's host keeps its own copy).
func (m *Manager) DeleteImage(ctx context.Context, name string) error {
	r, err := m.image(ctx, name)
	if err != nil {
		return err
	}
	users, err := m.usersOf(ctx)
	if err != nil {
		return err
	}
	if vms := users[r.Digest]; len(vms) > 0 {
		return errorf(ErrConflict, "image %s is used by vm(s) %s: delete them first", name, strings.Join(vms, ", "))
	}
	if err := m.store.Delete(ctx, imageKey(name)); err != nil {
		return wrapf(ErrUnavailable, err, "delete image %s", name)
	}
	m.publish(api.Event{Type: "image.deleted", Message: name})
	return nil
}

// resolveImage turns an image name into what a VM's spec names.
func (m *Manager) resolveImage(ctx context.Context, name string, iso bool) (*hostproto.ImageRef, int64, error) {
	r, err := m.image(ctx, name)
	if err != nil {
		return nil, 0, err
	}
	switch {
	case iso && r.Format != imagestore.FormatISO:
		return nil, 0, errorf(ErrInvalid, "image %s is a %s disk, not an ISO: give it with --image", name, r.Format)
	case !iso && r.Format == imagestore.FormatISO:
		return nil, 0, errorf(ErrInvalid, "image %s is an ISO: give it with --iso (an installer) and an empty --disk", name)
	}
	return &hostproto.ImageRef{Name: r.Name, Digest: r.Digest, Format: r.Format, Size: r.FileSize}, r.VirtualSize, nil
}

// advertise records that this manager holds the blob of digest.
func (m *Manager) advertise(ctx context.Context, digest string) {
	lease, err := m.locks.lease(ctx)
	if err != nil {
		return
	}
	if err := m.store.PutLease(ctx, "imageholders/"+digest+"/"+m.name, m.name, lease); err != nil {
		m.log.Warn("advertise image blob", "digest", digest, "err", err)
	}
}

// syncImages keeps this manager's blob store in step with the image
// records, until ctx ends: it fetches what it lacks from a manager that
// has it, advertises what it holds, and drops blobs no record names.
func (m *Manager) syncImages(ctx context.Context) {
	if m.images == nil {
		return
	}
	for {
		m.syncImagesOnce(ctx)
		select {
		case <-ctx.Done():
			return
		case <-time.After(imageSync):
		}
	}
}

func (m *Manager) syncImagesOnce(ctx context.Context) {
	if m.url != "" {
		if lease, err := m.locks.lease(ctx); err == nil {
			m.store.PutLease(ctx, "managers/"+m.name, managerRecord{Name: m.name, URL: m.url}, lease)
		}
	}
	recs, err := m.imageRecords(ctx)
	if err != nil {
		return
	}
	wanted := map[string]bool{}
	for _, r := range recs {
		wanted[r.Digest] = true
		if !m.images.Has(r.Digest) {
			if err := m.fetchBlob(ctx, r.Digest); err != nil {
				m.log.Warn("fetch image from another manager", "image", r.Name, "digest", r.Digest, "err", err)
				continue
			}
			m.log.Info("image copied from another manager", "image", r.Name, "digest", r.Digest)
		}
		m.advertise(ctx, r.Digest)
	}
	// Blobs no image names, past the grace an import needs (it places its
	// blob before it records the image), go unless a VM uses one: the VMs
	// are looked at only then (every 10 s, it was a read of every record).
	held, _ := m.images.List()
	var unnamed []string
	for _, d := range held {
		if st, err := os.Stat(m.images.Path(d)); !wanted[d] && err == nil && time.Since(st.ModTime()) >= blobGrace {
			unnamed = append(unnamed, d)
		}
	}
	if len(unnamed) == 0 {
		return
	}
	// A VM made from an image deleted at the same moment keeps the blob.
	users, err := m.usersOf(ctx)
	if err != nil {
		return
	}
	for _, d := range unnamed {
		if len(users[d]) > 0 {
			continue
		}
		m.images.Remove(d)
		m.store.Delete(ctx, "imageholders/"+d+"/"+m.name)
	}
}

// blobGrace is how long a blob no record names is kept.
const blobGrace = 10 * time.Minute

// fetchBlob copies a blob from a manager that holds it.
func (m *Manager) fetchBlob(ctx context.Context, digest string) error {
	if m.identity == nil {
		return errors.New("no certificate to reach other managers with")
	}
	kvs, err := m.store.List(ctx, "imageholders/"+digest+"/")
	if err != nil {
		return err
	}
	var lastErr error = errors.New("no manager holds it")
	for _, kv := range kvs {
		holder := kv.Key
		if holder == m.name {
			continue
		}
		var mr managerRecord
		if _, err := m.store.Get(ctx, "managers/"+holder, &mr); err != nil {
			lastErr = fmt.Errorf("manager %s: %w", holder, err)
			continue
		}
		tlsConf := pki.ClientConfig(m.identity.CA.Pool(), m.identity.Holder, "")
		tlsConf.VerifyConnection = pki.RequirePeer(pki.RoleManager, holder)
		hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf}}
		fctx, cancel := context.WithTimeout(ctx, time.Hour)
		req, _ := http.NewRequestWithContext(fctx, http.MethodGet, strings.TrimRight(mr.URL, "/")+"/v1/images/blobs/"+digest, nil)
		resp, err := hc.Do(req)
		if err == nil && resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			err = fmt.Errorf("%s answered %s", holder, resp.Status)
		}
		if err == nil {
			err = m.images.Add(resp.Body, digest, MaxImageBytes)
			resp.Body.Close()
		}
		cancel()
		if err == nil {
			return nil
		}
		lastErr = err
	}
	return lastErr
}

// handleBlob serves a blob to a host or another manager; a manager that
// lacks it fetches it first.
func (m *Manager) handleBlob(w http.ResponseWriter, r *http.Request) {
	digest := r.PathValue("digest")
	if !imagestore.ValidDigest(digest) || m.images == nil {
		writeError(w, m.log, errorf(ErrNotFound, "no image blob %s", digest))
		return
	}
	if !m.images.Has(digest) {
		if err := m.fetchBlob(r.Context(), digest); err != nil {
			writeError(w, m.log, errorf(ErrNotFound, "no manager holds image blob %s: %v", digest, err))
			return
		}
	}
	// A large image takes longer than the server's usual read limit.
	http.NewResponseController(w).SetWriteDeadline(time.Time{})
	w.Header().Set("Content-Type", "application/octet-stream")
	http.ServeFile(w, r, m.images.Path(digest))
}

func (m *Manager) handleImageImport(w http.ResponseWriter, r *http.Request) {
	// An upload of gigabytes outlasts the server's read limit.
	http.NewResponseController(w).SetReadDeadline(time.Now().Add(6 * time.Hour))
	img, err := m.ImportImage(r.Context(), r.PathValue("name"), r.Body, callerOf(r).String())
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, img)
}

func (m *Manager) handleImageList(w http.ResponseWriter, r *http.Request) {
	out, err := m.Images(r.Context())
	if err != nil {
		writeError(w, m.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (m *Manager) handleImageDelete(w http.ResponseWriter, r *http.Request) {
	if err := m.DeleteImage(r.Context(), r.PathValue("name")); err != nil {
		writeError(w, m.log, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
