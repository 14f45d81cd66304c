package ckptstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vigil-project/vigil/internal/statefile"
)

// CommittedFile is the name of the committed checkpoint in a Receiver's
// directory. It is replaced by a rename, so it is always one whole
// checkpoint.
const CommittedFile = "checkpoint.vigil"

// PingEvery is how often each side of an idle stream pings the other.
const PingEvery = 200 * time.Millisecond

// Receiver is the secondary's side of one stream.
type Receiver struct {
	Dir        string // holds CommittedFile
	VM         string
	Generation int64
	// Heard is called on every frame from the primary (may be nil).
	Heard func()
	// Committed is called after each commit (may be nil).
	Committed func(statefile.Info)
	// MaxBytes bounds one checkpoint's memory stream (0: no bound).
	MaxBytes int64
}

// Committed returns the committed checkpoint in dir, if any.
func Committed(dir string) (statefile.Info, error) {
	r, err := statefile.Open(filepath.Join(dir, CommittedFile))
	if err != nil {
		return statefile.Info{}, err
	}
	defer r.Close()
	info := r.Info()
	if info.Kind != statefile.KindCheckpoint || info.Checkpoint == nil {
		return statefile.Info{}, fmt.Errorf("%s is a %s state file, not a checkpoint", info.Path, info.Kind)
	}
	return info, nil
}

// Serve receives checkpoints from c until the stream ends or ctx does.
// A checkpoint in progress when it ends is thrown away; the committed one
// stays. It pings the primary while the stream is idle.
func (rc *Receiver) Serve(ctx context.Context, c *Conn) error {
	if err := os.MkdirAll(rc.Dir, 0o700); err != nil {
		return err
	}
	t, p, err := c.ReadFrame()
	if err != nil {
		return fmt.Errorf("checkpoint stream: no hello: %w", err)
	}
	var h Hello
	if t != TypeHello {
		return rc.refuse(c, fmt.Errorf("checkpoint stream: the first frame is %q, not a hello", t))
	}
	if err := DecodeJSON(p, &h); err != nil {
		return rc.refuse(c, err)
	}
	if h.VM != rc.VM || h.Generation != rc.Generation {
		return rc.refuse(c, fmt.Errorf("checkpoint stream: this host keeps the standby of %s generation %d, not of %s generation %d", rc.VM, rc.Generation, h.VM, h.Generation))
	}
	if h.Run == "" {
		return rc.refuse(c, errors.New("checkpoint stream: the hello names no run"))
	}
	// A checkpoint of an earlier run of the VM (it was stopped and started
	// since) must never be resumed in place of this one.
	if info, err := Committed(rc.Dir); err == nil && (info.Checkpoint.Run != h.Run || info.Checkpoint.Generation != rc.Generation) {
		os.Remove(filepath.Join(rc.Dir, CommittedFile))
	}

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		t := time.NewTicker(PingEvery)
		defer t.Stop()
		for {
			select {
			case <-sctx.Done():
				return
			case <-t.C:
				if c.IdleFor() >= PingEvery {
					if c.WriteFrame(TypePing, nil) != nil {
						cancel()
						return
					}
				}
			}
		}
	}()

	var w *statefile.Writer
	var cur Begin
	var data int64
	defer func() {
		if w != nil {
			w.Abort()
		}
	}()
	for {
		t, p, err := c.ReadFrame()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if rc.Heard != nil {
			rc.Heard()
		}
		switch t {
		case TypePing:
		case TypeBegin:
			if w != nil {
				w.Abort()
				w = nil
			}
			var b Begin
			if err := DecodeJSON(p, &b); err != nil {
				return rc.refuse(c, err)
			}
			if !strings.HasPrefix(b.DiskSnapshot, DiskSnapshotPrefix) || len(b.DiskSnapshot) == len(DiskSnapshotPrefix) {
				return rc.refuse(c, fmt.Errorf("checkpoint stream: checkpoint %d names disk snapshot %q, not one of a checkpoint", b.Seq, b.DiskSnapshot))
			}
			w, err = statefile.Create(filepath.Join(rc.Dir, CommittedFile), statefile.Header{VM: rc.VM, Hardware: b.Hardware, QEMUVersion: b.QEMUVersion,
				Kind: statefile.KindCheckpoint, Checkpoint: &statefile.Checkpoint{Seq: b.Seq, DiskSnapshot: b.DiskSnapshot, Run: h.Run, Generation: rc.Generation}})
			if err != nil {
				return rc.refuse(c, err)
			}
			cur, data = b, 0
		case TypeData:
			if w == nil {
				return rc.refuse(c, errors.New("checkpoint stream: data outside a checkpoint"))
			}
			if rc.MaxBytes > 0 && data+int64(len(p)) > rc.MaxBytes {
				return rc.refuse(c, fmt.Errorf("checkpoint stream: checkpoint %d exceeds %d bytes", cur.Seq, rc.MaxBytes))
			}
			if _, err := w.Write(p); err != nil {
				return rc.refuse(c, err)
			}
			data += int64(len(p))
		case TypeAbort:
			if w != nil {
				w.Abort()
				w = nil
			}
		case TypeEnd:
			var e End
			if err := DecodeJSON(p, &e); err != nil {
				return rc.refuse(c, err)
			}
			if w == nil || e.Seq != cur.Seq || e.Size != data {
				return rc.refuse(c, fmt.Errorf("checkpoint stream: end of checkpoint %d (%d bytes) does not match checkpoint %d (%d bytes received)", e.Seq, e.Size, cur.Seq, data))
			}
			info, err := w.Commit()
			w = nil
			if err != nil {
				return rc.refuse(c, err)
			}
			if rc.Committed != nil {
				rc.Committed(info)
			}
			if err := c.WriteJSON(TypeAck, Ack{Seq: e.Seq}); err != nil {
				return err
			}
		case TypeError:
			var m ErrorMsg
			DecodeJSON(p, &m)
			return fmt.Errorf("checkpoint stream: the primary gave up: %s", m.Error)
		default:
			return rc.refuse(c, fmt.Errorf("checkpoint stream: unexpected frame %q from the primary", t))
		}
	}
}

// refuse tells the primary why and returns err.
func (rc *Receiver) refuse(c *Conn, err error) error {
	c.WriteJSON(TypeError, ErrorMsg{Error: err.Error()})
	return err
}
