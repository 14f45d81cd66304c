package hostagent

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// Console copies the VM's serial log to w. With follow it keeps copying new
// output, and follows the log to a new file when the VM reboots (the log is
// rotated at every start), until ctx ends.
func (a *Agent) Console(ctx context.Context, r hostproto.ConsoleRequest, w io.Writer) error {
	name, follow := r.VM, r.Follow
	path, err := a.SerialLog(name)
	if err != nil {
		return err
	}
	f, err := os.Open(path)
	if os.IsNotExist(err) && !follow {
		return nil // never started: an empty console
	}
	if err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("open console of %s: %w", name, err)
	}
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	if !follow {
		_, err := io.Copy(w, f)
		return err
	}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		if f != nil {
			if _, err := io.Copy(w, f); err != nil {
				return err
			}
			// A new boot rotates the log: switch to the new file once it exists.
			if cur, err := os.Stat(path); err == nil {
				if old, err := f.Stat(); err == nil && !os.SameFile(cur, old) {
					io.Copy(w, f)
					f.Close()
					f = nil
				}
			}
		}
		if f == nil {
			if nf, err := os.Open(path); err == nil {
				f = nf
				continue
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
