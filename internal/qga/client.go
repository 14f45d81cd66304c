// Package qga is a client for the QEMU guest agent (qemu-ga) running inside
// a guest.
//
// The agent speaks over a virtio-serial port named org.qemu.guest_agent.0.
// On the host that port is backed by a QEMU chardev socket
// (-chardev socket,path=SOCK,server=on,wait=off): QEMU listens and the
// client connects to SOCK. The protocol is QMP-like but simpler and less
// forgiving:
//
//   - A request is one JSON object {"execute":CMD,"arguments":ARGS} on a
//     line; an answer is {"return":VALUE} or {"error":{"class","desc"}} on a
//     line. There are no request ids, so answers pair with requests only by
//     order: a Client sends one request at a time.
//   - The agent's JSON parser outlives client connections. A client that went
//     away mid-request leaves a half-read object in it that swallows the next
//     client's requests (checked against qemu-ga 7.2: after a half line, later
//     connections got no answer at all). Likewise an answer meant for an
//     earlier client can still be on its way. So every connection starts with
//     a 0xFF byte, which makes the agent's parser drop its state, followed by
//     guest-sync-delimited with a random id; the agent puts a 0xFF before that
//     answer, and everything before it, and any answer with another id, is
//     discarded.
//   - A hung guest, a paused VM or a guest without a running agent simply
//     never answers: QEMU still accepts the connection. Every exchange
//     therefore has a deadline (the caller's, or DefaultTimeout) enforced
//     with socket deadlines, and silence is reported as ErrNoAnswer.
//   - The guest is not trusted. Lines are bounded in size, answers are
//     decoded defensively, and anything malformed is ErrProtocol.
//
// QEMU's chardev serves one client at a time (later ones wait unanswered
// in the listen backlog), so use one Client per VM.
//
// Connection policy: after any failure other than an error answer from the
// agent (silence, garbage, a broken socket) the Client drops its
// connection, because an answer may still be in flight and would otherwise
// be read as the answer to the next request. The next call dials the socket
// again and resynchronises. A Client can therefore be kept for the life of
// a VM: it recovers by itself once the agent answers again, including after
// QEMU was restarted on the same socket path.
package qga

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultTimeout bounds an exchange whose context has no deadline. Without
// it, one call to the agent of a hung guest would block forever.
const DefaultTimeout = 30 * time.Second

const (
	// execPoll is how often Exec asks whether the process has exited; the
	// agent offers no notification.
	execPoll = 50 * time.Millisecond
	// execPollTimeout bounds one guest-exec-status exchange.
	execPollTimeout = 10 * time.Second
	// shutdownGrace is how long Shutdown waits for the agent to either
	// complain or move on; see Shutdown.
	shutdownGrace = 3 * time.Second
)

// Client talks to one guest agent. It holds no global state; all methods
// are safe for concurrent use, and calls are carried out one at a time.
type Client struct {
	path string

	// Tunables, fixed after Dial; tests shorten them.
	timeout       time.Duration
	poll          time.Duration
	shutdownGrace time.Duration

	// turn is held for a whole exchange (request and answer), since the
	// agent pairs answers with requests only by order. It is a channel
	// rather than a mutex so that a caller queued behind a slow exchange can
	// still give up on its context.
	turn chan struct{}

	// lostAnswers counts guest-exec-status answers that never came (each
	// asked again on a fresh connection).
	lostAnswers atomic.Int64

	mu     sync.Mutex
	conn   *conn // nil when there is no synchronised connection
	closed bool
}

// conn is one connection to the agent's socket.
type conn struct {
	nc net.Conn
	r  *bufio.Reader
	// dirty marks a connection that must not carry another request even
	// though the exchange itself succeeded (Shutdown leaves answers pending).
	dirty bool
}

// LostAnswers is how many guest-exec-status answers never came and were
// asked for again.
func (c *Client) LostAnswers() int64 { return c.lostAnswers.Load() }

// Dial connects to the chardev socket of a guest agent and synchronises
// with the agent, so an error here means the agent is not answering (or
// the socket is not there). ctx bounds only the connection set-up; without
// a deadline DefaultTimeout applies.
func Dial(ctx context.Context, socketPath string) (*Client, error) {
	c := &Client{
		path:          socketPath,
		timeout:       DefaultTimeout,
		poll:          execPoll,
		shutdownGrace: shutdownGrace,
		turn:          make(chan struct{}, 1),
	}
	if err := c.do(ctx, func(context.Context, *conn) error { return nil }); err != nil {
		c.Close()
		return nil, fmt.Errorf("qga: connect to %s: %w", socketPath, err)
	}
	return c, nil
}

// Close closes the connection. A call in progress fails promptly with
// ErrClosed, as do all later calls. Calling Close more than once is
// harmless.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	if c.conn == nil {
		return nil
	}
	err := c.conn.nc.Close()
	c.conn = nil
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("qga: close: %w", err)
	}
	return nil
}

// Run executes one agent command. args, if non-nil, is marshaled as the
// command's "arguments"; resp, if non-nil, receives the decoded "return"
// value. An error answer from the agent is returned as a wrapped *Error;
// silence until the deadline as ErrNoAnswer; a malformed answer as
// ErrProtocol.
//
// When Run fails for any reason other than an error answer, the command
// may or may not have run in the guest.
func (c *Client) Run(ctx context.Context, cmd string, args, resp any) error {
	if err := c.run(ctx, cmd, args, resp, maxAnswer); err != nil {
		return fmt.Errorf("qga: %w", err)
	}
	return nil
}

// run is Run with a choice of the bound on the answer line, and without
// the package prefix on errors, for use inside other operations.
func (c *Client) run(ctx context.Context, cmd string, args, resp any, limit int) error {
	req, err := encodeRequest(cmd, args)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	err = c.do(ctx, func(ctx context.Context, cn *conn) error {
		if _, err := cn.nc.Write(req); err != nil {
			return err
		}
		line, err := readLine(cn.r, limit)
		if err != nil {
			return err
		}
		raw, err := decodeAnswer(line)
		if err != nil {
			return err
		}
		if rm, ok := resp.(*json.RawMessage); ok {
			// Spare a second scan of answers that can be megabytes of
			// base64; the caller decodes them itself.
			*rm = raw
			return nil
		}
		if resp != nil {
			if err := json.Unmarshal(raw, resp); err != nil {
				return protocolError("decode return value: %v", err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	return nil
}

// do runs one exchange with the agent: it waits for its turn, connects and
// synchronises if there is no usable connection, bounds the exchange with
// ctx's deadline (or DefaultTimeout) and classifies the outcome. An error
// answer from the agent leaves the connection in step and usable; any other
// failure drops it (see the package comment).
func (c *Client) do(ctx context.Context, exchange func(context.Context, *conn) error) error {
	if err := ctx.Err(); err != nil {
		return err // not the agent's fault: it was never asked
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	select {
	case c.turn <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.turn }()

	cn, err := c.connect(ctx)
	if err != nil {
		return err
	}

	disarm := arm(ctx, cn.nc)
	err = exchange(ctx, cn)
	disarm()

	var agentErr *Error
	if err == nil || errors.As(err, &agentErr) {
		if cn.dirty {
			c.drop(cn)
		}
		return err
	}
	c.drop(cn)
	return c.classify(ctx, err)
}

// connect returns the current connection, or dials and synchronises a new
// one. The caller holds the turn.
func (c *Client) connect(ctx context.Context) (*conn, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	cn := c.conn
	c.mu.Unlock()
	if cn != nil {
		if cn.r.Buffered() == 0 {
			return cn, nil
		}
		// The guest sent something nobody asked for. It would be taken
		// as the answer to the next request, so start afresh.
		c.drop(cn)
	}

	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", c.path)
	if err != nil {
		return nil, c.classify(ctx, err)
	}
	cn = &conn{nc: nc, r: bufio.NewReaderSize(nc, 64<<10)}
	// Publish the connection before synchronising so that Close can
	// interrupt a sync with a silent agent.
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		nc.Close()
		return nil, ErrClosed
	}
	c.conn = cn
	c.mu.Unlock()

	disarm := arm(ctx, nc)
	err = cn.sync()
	disarm()
	if err != nil {
		c.drop(cn)
		return nil, fmt.Errorf("sync: %w", c.classify(ctx, err))
	}
	return cn, nil
}

// sync flushes the agent's parser and waits for the answer to a fresh
// guest-sync-delimited, discarding everything before it.
func (cn *conn) sync() error {
	id, req, err := syncRequest()
	if err != nil {
		return err
	}
	// The leading 0xFF makes the agent drop a half-read request left by an
	// earlier client. The agent answers it with a parse error, which is
	// discarded below together with any other stale output.
	if _, err := cn.nc.Write(append([]byte{sentinel}, req...)); err != nil {
		return err
	}
	for {
		if err := skipToSentinel(cn.r); err != nil {
			return err
		}
		line, err := readLine(cn.r, maxSyncLine)
		if errors.Is(err, errLineTooLong) {
			continue // garbage after a stray 0xFF; keep looking
		}
		if err != nil {
			return err
		}
		if i := bytes.LastIndexByte(line, sentinel); i >= 0 {
			line = line[i+1:] // a later sentinel on the same line wins
		}
		if syncAnswerID(line) == id {
			return nil
		}
		// A stale sync answer for an earlier client, or garbage.
	}
}

// syncRequest returns a guest-sync-delimited request with a fresh random
// id. The id is random, not a counter, so that a stale answer meant for an
// earlier client (or an earlier connection of ours) cannot match it.
func syncRequest() (int64, []byte, error) {
	// Below 2^53 so that the id survives a trip through a JSON
	// implementation that keeps numbers as doubles.
	id := rand.Int64N(1 << 53)
	req, err := encodeRequest("guest-sync-delimited", map[string]int64{"id": id})
	return id, req, err
}

// syncAnswerID returns the id in a guest-sync-delimited answer, or -1.
func syncAnswerID(line []byte) int64 {
	raw, err := decodeAnswer(line)
	if err != nil {
		return -1
	}
	var id int64
	if json.Unmarshal(raw, &id) != nil || id < 0 {
		return -1
	}
	return id
}

// arm makes ctx's deadline and cancellation interrupt blocking reads and
// writes on nc, which cannot watch a context themselves. The returned
// function must be called when the exchange is over.
func arm(ctx context.Context, nc net.Conn) (disarm func()) {
	dl, _ := ctx.Deadline()
	nc.SetDeadline(dl)
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		nc.SetDeadline(time.Unix(1, 0))
		close(fired)
	})
	return func() {
		if !stop() {
			// Wait for the deadline to be set so it cannot land after the
			// next exchange has armed its own.
			<-fired
		}
	}
}

// drop forgets cn if it is still the current connection, and closes it.
func (c *Client) drop(cn *conn) {
	c.mu.Lock()
	if c.conn == cn {
		c.conn = nil
	}
	c.mu.Unlock()
	cn.nc.Close()
}

// classify turns a failed exchange into the error callers branch on.
func (c *Client) classify(ctx context.Context, err error) error {
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	switch {
	case closed:
		return ErrClosed
	case errors.Is(err, ErrProtocol), errors.Is(err, ErrClosed):
		return err
	case errors.Is(ctx.Err(), context.Canceled):
		return ctx.Err()
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%w: %w", ErrNoAnswer, context.DeadlineExceeded)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("connection closed by the other end: %w", err)
	}
	return err
}
