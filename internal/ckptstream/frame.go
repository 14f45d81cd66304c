// Package ckptstream is the wire format of a protected VM's checkpoint
// stream, from the host that runs it (the primary) to the host that keeps
// its synchronized standby (the secondary), and the secondary's side of it:
// each checkpoint is written to a state file and becomes the committed one
// only when it arrived whole, so a failure mid-transfer leaves the previous
// checkpoint untouched.
//
// The stream is a sequence of frames, each a type byte, a big-endian
// uint32 payload length and the payload. The primary opens with a Hello,
// then sends, per checkpoint, a Begin, the QEMU migration stream in Data
// frames and an End (or an Abort); the secondary answers each committed
// checkpoint with an Ack. Both sides send Pings when they have nothing
// else to say: the direct heartbeat between the two hosts.
package ckptstream

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// DiskSnapshotPrefix starts the name of every checkpoint's internal disk
// snapshot: a checkpoint naming another snapshot is refused.
const DiskSnapshotPrefix = "vigil-ckpt-"

// Frame types.
const (
	TypeHello = 'H' // primary: Hello
	TypeBegin = 'B' // primary: Begin
	TypeData  = 'D' // primary: raw bytes of the migration stream
	TypeEnd   = 'E' // primary: End
	TypeAbort = 'X' // primary: the checkpoint in progress is abandoned
	TypeAck   = 'A' // secondary: Ack
	TypePing  = 'P' // both: empty
	TypeError = 'F' // both: ErrorMsg; the sender hangs up after it
)

// MaxPayload bounds a frame's payload: a reader never allocates more.
const MaxPayload = 1 << 20

// Hello opens a stream: which VM, for which pairing (the manager's
// generation), and which run of its QEMU the checkpoints come from.
type Hello struct {
	VM         string `json:"vm"`
	Generation int64  `json:"generation"`
	Run        string `json:"run"`
}

// Begin starts checkpoint Seq: its memory follows in Data frames; its disk
// is the internal snapshot DiskSnapshot of the VM's disk, taken at the
// instant the guest stopped for the switchover.
type Begin struct {
	Seq          uint64          `json:"seq"`
	DiskSnapshot string          `json:"disk_snapshot"`
	Hardware     json.RawMessage `json:"hardware"`
	QEMUVersion  string          `json:"qemu_version"`
}

// End closes checkpoint Seq after Size bytes of Data.
type End struct {
	Seq  uint64 `json:"seq"`
	Size int64  `json:"size"`
}

// Ack says checkpoint Seq is committed on the secondary.
type Ack struct {
	Seq uint64 `json:"seq"`
}

// ErrorMsg says why the sender gives up.
type ErrorMsg struct {
	Error string `json:"error"`
}

// Conn reads and writes frames. Writes are safe from several goroutines
// (a frame is never interleaved with another); reads are for one.
type Conn struct {
	r   *bufio.Reader
	wmu sync.Mutex
	w   io.Writer
	buf []byte
	// written is when a frame was last written (for pings).
	written time.Time
}

// NewConn frames rw.
func NewConn(rw io.ReadWriter) *Conn {
	return &Conn{r: bufio.NewReaderSize(rw, 64<<10), w: rw}
}

// WriteFrame writes one frame.
func (c *Conn) WriteFrame(t byte, payload []byte) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("checkpoint stream: frame of %d bytes exceeds %d", len(payload), MaxPayload)
	}
	// One write per frame: on TLS each write is a record of its own.
	b := make([]byte, 5+len(payload))
	copy(b[5:], payload)
	return c.writeFramed(t, b)
}

// writeFramed writes a frame whose payload is b[5:], filling b[:5].
func (c *Conn) writeFramed(t byte, b []byte) error {
	b[0] = t
	binary.BigEndian.PutUint32(b[1:5], uint32(len(b)-5))
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.written = time.Now()
	if _, err := c.w.Write(b); err != nil {
		return fmt.Errorf("checkpoint stream: write: %w", err)
	}
	return nil
}

// WriteJSON writes a frame whose payload is v as JSON.
func (c *Conn) WriteJSON(t byte, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("checkpoint stream: encode: %w", err)
	}
	return c.WriteFrame(t, b)
}

// IdleFor is how long ago a frame was last written.
func (c *Conn) IdleFor() time.Duration {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return time.Since(c.written)
}

// ReadFrame reads the next frame. The payload is valid until the next
// ReadFrame.
func (c *Conn) ReadFrame() (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, fmt.Errorf("checkpoint stream: truncated frame header: %w", err)
		}
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > MaxPayload {
		return 0, nil, fmt.Errorf("checkpoint stream: frame of %d bytes exceeds %d", n, MaxPayload)
	}
	switch hdr[0] {
	case TypeHello, TypeBegin, TypeData, TypeEnd, TypeAbort, TypeAck, TypePing, TypeError:
	default:
		return 0, nil, fmt.Errorf("checkpoint stream: unknown frame type %q", hdr[0])
	}
	if cap(c.buf) < int(n) {
		c.buf = make([]byte, n)
	}
	b := c.buf[:n]
	if _, err := io.ReadFull(c.r, b); err != nil {
		return 0, nil, fmt.Errorf("checkpoint stream: truncated frame: %w", err)
	}
	return hdr[0], b, nil
}

// DecodeJSON decodes a frame's JSON payload into v, refusing unknown
// fields.
func DecodeJSON(payload []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(payload))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return fmt.Errorf("checkpoint stream: bad message: %w", err)
	}
	return nil
}

// AsyncData sends a migration stream as Data frames from a queue of up to
// maxQueued MiB, so that what writes into it (QEMU, through SaveState) is
// never held up by the network or the secondary: the guest's stop at a
// checkpoint's switchover lasts as long as QEMU's final pass into memory,
// not as long as sending it. Close sends what is queued and ends it.
func (c *Conn) AsyncData(maxQueued int) *AsyncData {
	a := &AsyncData{c: c, q: make(chan []byte, maxQueued), dead: make(chan struct{}), closing: make(chan struct{}), done: make(chan struct{})}
	go a.send()
	return a
}

// AsyncData is a queued sender of Data frames (see Conn.AsyncData).
type AsyncData struct {
	c       *Conn
	q       chan []byte   // never closed: a producer may still be running
	dead    chan struct{} // closed when sending failed
	closing chan struct{} // closed by Close
	done    chan struct{} // closed when the sender ended
	err     error         // the sending error (read after dead or done)
	n       atomic.Int64
	held    atomic.Bool // see Hold
}

// Hold pauses sending while the queue is less than three quarters full,
// until Release: while the guest is stopped at a checkpoint's switchover,
// QEMU's final pass should not share the CPU with encrypting and sending
// the pass before it. A queue filling up is sent anyway (QEMU would
// otherwise wait for room with the guest stopped).
func (a *AsyncData) Hold() { a.held.Store(true) }

// Release ends a Hold.
func (a *AsyncData) Release() { a.held.Store(false) }

// holding says whether the sender should wait now.
func (a *AsyncData) holding() bool {
	return a.held.Load() && len(a.q) < cap(a.q)*3/4
}

var dataBufs = sync.Pool{New: func() any { return make([]byte, 5+MaxPayload) }}

// errClosed ends a ReadFrom still running when Close was called (a save
// that failed and returned before its copy ended).
var errClosed = errors.New("checkpoint stream: data sender closed")

func (a *AsyncData) send() {
	defer close(a.done)
	put := func(b []byte) {
		if a.err == nil {
			if err := a.c.writeFramed(TypeData, b); err != nil {
				a.err = err
				close(a.dead)
			}
		}
		dataBufs.Put(b[:cap(b)])
	}
	for {
		for a.holding() {
			select {
			case <-a.closing:
			case <-time.After(time.Millisecond):
				continue
			}
			break
		}
		select {
		case b := <-a.q:
			put(b)
		case <-a.closing:
			for { // what was queued before Close
				select {
				case b := <-a.q:
					put(b)
				default:
					return
				}
			}
		}
	}
}

// ReadFrom queues everything r gives, in frames of up to MaxPayload.
func (a *AsyncData) ReadFrom(r io.Reader) (int64, error) {
	var total int64
	for {
		b := dataBufs.Get().([]byte)
		k, err := io.ReadFull(r, b[5:])
		if k > 0 {
			select {
			case a.q <- b[:5+k]:
				total += int64(k)
				a.n.Add(int64(k))
			case <-a.dead:
				return total, a.err
			case <-a.closing:
				return total, errClosed
			}
		}
		switch {
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			return total, nil
		case err != nil:
			return total, err
		}
	}
}

// Write queues p.
func (a *AsyncData) Write(p []byte) (int, error) {
	n, err := a.ReadFrom(bytes.NewReader(p))
	return int(n), err
}

// Written is how many bytes were queued.
func (a *AsyncData) Written() int64 { return a.n.Load() }

// Close sends what was queued before it, ends the sender, and reports a
// sending error. A ReadFrom still running ends with an error.
func (a *AsyncData) Close() error {
	close(a.closing)
	<-a.done
	return a.err
}

// DataWriter returns a writer that sends what it is given as Data frames
// (and counts it).
func (c *Conn) DataWriter() *DataWriter { return &DataWriter{c: c} }

// DataWriter sends bytes as Data frames.
type DataWriter struct {
	c *Conn
	n int64
}

func (d *DataWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		k := min(len(p), MaxPayload)
		if err := d.c.WriteFrame(TypeData, p[:k]); err != nil {
			return written, err
		}
		written += k
		d.n += int64(k)
		p = p[k:]
	}
	return written, nil
}

// Written is how many bytes went out.
func (d *DataWriter) Written() int64 { return d.n }
