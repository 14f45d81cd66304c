package ckptstream

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vigil-project/vigil/internal/statefile"
)

// primary drives one end of a pipe as a primary host would.
type primary struct {
	t *testing.T
	c *Conn
}

func startReceiver(t *testing.T, dir string) (*primary, chan error, net.Conn) {
	t.Helper()
	a, b := net.Pipe()
	rc := &Receiver{Dir: dir, VM: "web", Generation: 3, MaxBytes: 1000}
	done := make(chan error, 1)
	go func() { done <- rc.Serve(context.Background(), NewConn(b)); b.Close() }()
	t.Cleanup(func() { a.Close() })
	return &primary{t: t, c: NewConn(a)}, done, a
}

func (p *primary) send(typ byte, v any) {
	p.t.Helper()
	if err := p.c.WriteJSON(typ, v); err != nil {
		p.t.Fatal(err)
	}
}

// ack reads frames until an ack or an error.
func (p *primary) ack() (Ack, error) {
	for {
		typ, b, err := p.c.ReadFrame()
		if err != nil {
			return Ack{}, err
		}
		switch typ {
		case TypePing:
			continue
		case TypeAck:
			var a Ack
			return a, DecodeJSON(b, &a)
		case TypeError:
			var m ErrorMsg
			DecodeJSON(b, &m)
			return Ack{}, &refused{m.Error}
		}
	}
}

type refused struct{ msg string }

func (r *refused) Error() string { return r.msg }

func (p *primary) checkpoint(seq uint64, data []byte) {
	p.t.Helper()
	p.send(TypeBegin, Begin{Seq: seq, DiskSnapshot: "vigil-ckpt-1", Hardware: json.RawMessage(`{"memory":1}`), QEMUVersion: "7.2"})
	w := p.c.DataWriter()
	if _, err := w.Write(data); err != nil {
		p.t.Fatal(err)
	}
	p.send(TypeEnd, End{Seq: seq, Size: w.Written()})
}

func payload(t *testing.T, dir string) (statefile.Info, []byte) {
	t.Helper()
	r, err := statefile.Open(filepath.Join(dir, CommittedFile))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := r.Verify(nil); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(r.Payload())
	if err != nil {
		t.Fatal(err)
	}
	return r.Info(), b
}

func TestCheckpointsCommitWhole(t *testing.T) {
	dir := t.TempDir()
	p, done, raw := startReceiver(t, dir)
	p.send(TypeHello, Hello{VM: "web", Generation: 3, Run: "r1"})
	first := bytes.Repeat([]byte("a"), 900)
	p.checkpoint(7, first)
	if a, err := p.ack(); err != nil || a.Seq != 7 {
		t.Fatalf("ack = %+v, %v; want seq 7", a, err)
	}
	info, got := payload(t, dir)
	if !bytes.Equal(got, first) || info.Checkpoint.Seq != 7 || info.Checkpoint.Run != "r1" || info.Checkpoint.Generation != 3 {
		t.Fatalf("committed %d bytes, checkpoint %+v", len(got), info.Checkpoint)
	}
	// The next checkpoint dies half-way: the first stays committed.
	p.send(TypeBegin, Begin{Seq: 8, DiskSnapshot: "vigil-ckpt-2"})
	p.c.DataWriter().Write([]byte("half of it"))
	raw.Close()
	if err := <-done; err != nil && !strings.Contains(err.Error(), "closed") {
		t.Logf("receiver ended: %v", err)
	}
	info, got = payload(t, dir)
	if !bytes.Equal(got, first) || info.Checkpoint.Seq != 7 {
		t.Fatalf("after a cut stream the committed checkpoint is %d (%d bytes)", info.Checkpoint.Seq, len(got))
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("dir holds %d entries, want only the committed checkpoint", len(ents))
	}
}

func TestCheckpointOfAnotherRunIsDropped(t *testing.T) {
	dir := t.TempDir()
	p, _, raw := startReceiver(t, dir)
	p.send(TypeHello, Hello{VM: "web", Generation: 3, Run: "r1"})
	p.checkpoint(1, []byte("boot one"))
	if _, err := p.ack(); err != nil {
		t.Fatal(err)
	}
	raw.Close()
	p, _, _ = startReceiver(t, dir)
	p.send(TypeHello, Hello{VM: "web", Generation: 3, Run: "r2"})
	p.send(TypePing, nil)
	deadline := time.Now().Add(2 * time.Second)
	for {
		if _, err := Committed(dir); err != nil {
			break // dropped
		}
		if time.Now().After(deadline) {
			t.Fatal("the checkpoint of run r1 is still committed after run r2 said hello")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestReceiverRefuses(t *testing.T) {
	cases := []struct {
		name  string
		hello Hello
		then  func(p *primary)
		want  string
	}{
		{"other vm", Hello{VM: "db", Generation: 3, Run: "r"}, nil, "standby of web"},
		{"old generation", Hello{VM: "web", Generation: 2, Run: "r"}, nil, "generation 3"},
		{"no run", Hello{VM: "web", Generation: 3}, nil, "no run"},
		{"data first", Hello{VM: "web", Generation: 3, Run: "r"}, func(p *primary) { p.c.WriteFrame(TypeData, []byte("x")) }, "outside a checkpoint"},
		{"short", Hello{VM: "web", Generation: 3, Run: "r"}, func(p *primary) {
			p.send(TypeBegin, Begin{Seq: 1, DiskSnapshot: "vigil-ckpt-1"})
			p.c.WriteFrame(TypeData, []byte("abc"))
			p.send(TypeEnd, End{Seq: 1, Size: 4})
		}, "does not match"},
		{"no disk", Hello{VM: "web", Generation: 3, Run: "r"}, func(p *primary) { p.send(TypeBegin, Begin{Seq: 1}) }, "not one of a checkpoint"},
		{"a user's snapshot", Hello{VM: "web", Generation: 3, Run: "r"}, func(p *primary) { p.send(TypeBegin, Begin{Seq: 1, DiskSnapshot: "before-upgrade"}) }, "not one of a checkpoint"},
		{"too big", Hello{VM: "web", Generation: 3, Run: "r"}, func(p *primary) {
			p.send(TypeBegin, Begin{Seq: 1, DiskSnapshot: "vigil-ckpt-1"})
			p.c.WriteFrame(TypeData, make([]byte, 2000))
		}, "exceeds 1000 bytes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p, done, _ := startReceiver(t, dir)
			p.send(TypeHello, tc.hello)
			if tc.then != nil {
				tc.then(p)
			}
			_, err := p.ack()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error with %q", err, tc.want)
			}
			if rerr := <-done; rerr == nil {
				t.Fatal("the receiver did not fail")
			}
			if _, err := Committed(dir); err == nil {
				t.Fatal("a refused stream committed a checkpoint")
			}
		})
	}
}

func TestFrameLimits(t *testing.T) {
	var buf bytes.Buffer
	c := NewConn(&buf)
	if err := c.WriteFrame(TypeData, make([]byte, MaxPayload+1)); err == nil {
		t.Fatal("an oversized frame was written")
	}
	buf.Write([]byte{TypeData, 0xff, 0xff, 0xff, 0xff})
	if _, _, err := c.ReadFrame(); err == nil || !strings.Contains(err.Error(), "exceeds") {
		t.Fatalf("oversized frame read: %v", err)
	}
	buf.Reset()
	buf.Write([]byte{'?', 0, 0, 0, 0})
	if _, _, err := NewConn(&buf).ReadFrame(); err == nil || !strings.Contains(err.Error(), "unknown frame type") {
		t.Fatalf("unknown frame read: %v", err)
	}
}

// rw is a connection whose reads come from a fixed input.
type rw struct {
	io.Reader
	io.Writer
}

func FuzzReceiver(f *testing.F) {
	var seed bytes.Buffer
	c := NewConn(&seed)
	c.WriteJSON(TypeHello, Hello{VM: "web", Generation: 3, Run: "r"})
	c.WriteJSON(TypeBegin, Begin{Seq: 1, DiskSnapshot: "vigil-ckpt-1"})
	c.WriteFrame(TypeData, []byte("memory"))
	c.WriteJSON(TypeEnd, End{Seq: 1, Size: 6})
	f.Add(seed.Bytes())
	f.Add([]byte{TypeHello, 0, 0, 0, 2, '{', '}'})
	f.Fuzz(func(t *testing.T, in []byte) {
		dir := t.TempDir()
		rc := &Receiver{Dir: dir, VM: "web", Generation: 3}
		rc.Serve(context.Background(), NewConn(rw{bytes.NewReader(in), io.Discard}))
		// Whatever came in, what is committed is a whole, valid checkpoint.
		if _, err := os.Stat(filepath.Join(dir, CommittedFile)); err == nil {
			r, err := statefile.Open(filepath.Join(dir, CommittedFile))
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if err := r.Verify(nil); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// TestAsyncData: a stream goes out in frames of at most MaxPayload, all of
// it, in order; Close while a producer is still feeding it (a save that
// failed and returned before its copy ended) ends the producer with an
// error instead of a panic.
func TestAsyncData(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	got := make(chan []byte, 1)
	go func() {
		c := NewConn(b)
		var all []byte
		for {
			typ, p, err := c.ReadFrame()
			if err != nil {
				got <- all
				return
			}
			if typ != TypeData || len(p) > MaxPayload {
				got <- nil
				return
			}
			all = append(all, p...)
		}
	}()
	want := bytes.Repeat([]byte("0123456789abcdef"), (3*MaxPayload+17)/16)
	ad := NewConn(a).AsyncData(2)
	if n, err := ad.ReadFrom(bytes.NewReader(want)); err != nil || n != int64(len(want)) || ad.Written() != n {
		t.Fatalf("ReadFrom = %d, %v (written %d)", n, err, ad.Written())
	}
	if err := ad.Close(); err != nil {
		t.Fatal(err)
	}
	a.Close()
	if all := <-got; !bytes.Equal(all, want) {
		t.Fatalf("received %d bytes, sent %d", len(all), len(want))
	}

	// Nobody reads the other end: the queue fills and the producer blocks.
	c, d := net.Pipe()
	defer c.Close()
	defer d.Close()
	stuck := NewConn(c).AsyncData(1)
	pr, pw := io.Pipe()
	go func() {
		for {
			if _, err := pw.Write(make([]byte, MaxPayload)); err != nil {
				return
			}
		}
	}()
	res := make(chan error, 1)
	go func() { _, err := stuck.ReadFrom(pr); res <- err }()
	time.Sleep(100 * time.Millisecond)
	closed := make(chan error, 1)
	go func() { closed <- stuck.Close() }()
	select {
	case err := <-res:
		if err == nil {
			t.Fatal("the producer ended without an error after Close")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the producer still blocks after Close")
	}
	c.Close() // the sender is stuck writing the frame it had
	<-closed
	pr.Close()
}
