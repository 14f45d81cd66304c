package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"

	"github.com/vigil-project/vigil/internal/imagestore"
)

// localImages hands the dev agent's host the blobs of the manager's store
// on the same machine.
type localImages struct{ st *imagestore.Store }

// LinkImage shares the blob with the host's store (same machine, and
// usually the same file system) instead of copying it.
func (l localImages) LinkImage(digest string, into *imagestore.Store) error {
	return into.LinkFrom(l.st, digest)
}

func (l localImages) FetchImage(ctx context.Context, digest string, w io.Writer) error {
	if !imagestore.ValidDigest(digest) {
		return fmt.Errorf("bad digest %q", digest)
	}
	f, err := os.Open(l.st.Path(digest))
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(w, f)
	return err
}

// FetchImage gets a blob from the managers, in turn, over the host's
// mutual TLS (a manager serves blobs only to the cluster's hosts and
// managers).
func (j *joiner) FetchImage(ctx context.Context, digest string, w io.Writer) error {
	var errs []error
	for range j.cfg.Managers {
		url := j.url() + "/v1/images/blobs/" + digest
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		// The heartbeat client times out in seconds; an image takes longer.
		hc := &http.Client{Transport: j.http.Transport}
		resp, err := hc.Do(req)
		if err == nil && resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			err = fmt.Errorf("%s: %s", url, resp.Status)
		}
		if err == nil {
			_, err = io.Copy(w, resp.Body)
			resp.Body.Close()
			return err // a partial copy cannot be retried into the same writer
		}
		errs = append(errs, err)
		j.nextManager()
	}
	return errors.Join(errs...)
}
