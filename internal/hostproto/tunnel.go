package hostproto

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// A tunnel is a two-way byte stream to something a host keeps on a unix
// socket (a VM's VNC server), never on a TCP port: POST
// /v1/host/tunnels/{op} with the request as JSON and "Upgrade:
// vigil-tunnel" answers 101 Switching Protocols and the connection then
// carries the bytes both ways, or an error status before that.
const (
	tunnelsPath = "/v1/host/tunnels/"
	// TunnelProtocol is the Upgrade token of tunnels (the manager's public
	// API uses it too).
	TunnelProtocol = "vigil-tunnel"
)

// TunnelPath is the URL path of tunnel op.
func TunnelPath(op string) string { return tunnelsPath + op }

// TunnelOp is a declared host operation whose answer is a connection.
type TunnelOp[Req any] struct{ Name string }

// Open runs the operation on the host behind c and returns the connection;
// the caller closes it.
func (o TunnelOp[Req]) Open(ctx context.Context, c Conn, req Req) (io.ReadWriteCloser, error) {
	return c.Tunnel(ctx, o.Name, req)
}

func declareTunnel[Req any](name string, method func(Handler, context.Context, Req) (io.ReadWriteCloser, error)) TunnelOp[Req] {
	register(&entry{
		name: name, tunnel: true, reqType: fmt.Sprintf("%T", *new(Req)),
		decode: func(b []byte) (any, error) {
			var req Req
			if err := decodeStrict(b, &req); err != nil {
				return nil, err
			}
			return req, nil
		},
		serveTunnel: func(ctx context.Context, h Handler, req any) (io.ReadWriteCloser, error) {
			r, ok := req.(Req)
			if !ok {
				return nil, fmt.Errorf("%w: %s takes %T, not %T", ErrInvalid, name, *new(Req), req)
			}
			return method(h, ctx, r)
		},
	})
	return TunnelOp[Req]{Name: name}
}

// serveTunnel answers POST /v1/host/tunnels/{op}.
func serveTunnel(h Handler, w http.ResponseWriter, r *http.Request) {
	e, req, ok := decodeRequest(w, r, kindTunnel)
	if !ok {
		return
	}
	if !IsUpgrade(r) {
		writeError(w, fmt.Errorf("%w: a tunnel needs \"Connection: Upgrade\" and \"Upgrade: %s\"", ErrInvalid, TunnelProtocol))
		return
	}
	// The tunnel lives as long as its connection, not the request.
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	defer cancel()
	conn, err := e.serveTunnel(ctx, h, req)
	if err != nil {
		writeError(w, err)
		return
	}
	defer conn.Close()
	Splice(w, conn)
}

// IsUpgrade reports whether r asks to become a tunnel.
func IsUpgrade(r *http.Request) bool {
	return headerHas(r.Header, "Connection", "upgrade") && headerHas(r.Header, "Upgrade", TunnelProtocol)
}

// HeaderHas says whether header key lists token (comma-separated, any case).
func HeaderHas(h http.Header, key, token string) bool { return headerHas(h, key, token) }

func headerHas(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// Splice answers 101 on w, then copies bytes between the client's
// connection and conn until either side ends.
func Splice(w http.ResponseWriter, conn io.ReadWriteCloser) {
	// A session outlives the server's request deadlines, which the
	// hijacked connection would otherwise keep.
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Time{})
	rc.SetWriteDeadline(time.Time{})
	client, brw, err := rc.Hijack()
	if err != nil {
		writeError(w, fmt.Errorf("cannot open a tunnel over this connection (HTTP/1.1 is needed): %w", err))
		return
	}
	defer client.Close()
	if _, err := io.WriteString(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "+TunnelProtocol+"\r\n\r\n"); err != nil {
		return
	}
	if err := brw.Flush(); err != nil {
		return
	}
	pipe(struct {
		io.Reader
		io.Writer
		io.Closer
	}{io.MultiReader(io.LimitReader(brw.Reader, int64(brw.Reader.Buffered())), client), client, client}, conn)
}

// pipe copies a to b and b to a, and closes both once either direction
// ends (a VNC session is over when either end hangs up).
func pipe(a, b io.ReadWriteCloser) {
	var once sync.Once
	closeBoth := func() { a.Close(); b.Close() }
	var wg sync.WaitGroup
	wg.Go(func() { io.Copy(a, b); once.Do(closeBoth) })
	wg.Go(func() { io.Copy(b, a); once.Do(closeBoth) })
	wg.Wait()
}

// Pipe copies bytes both ways between a and b until either ends, then
// closes both.
func Pipe(a, b io.ReadWriteCloser) { pipe(a, b) }

// Tunnel opens a tunnel op on the host; see Conn.
func (c *Client) Tunnel(ctx context.Context, op string, req any) (io.ReadWriteCloser, error) {
	resp, err := c.do(ctx, tunnelsPath+url.PathEscape(op), req, func(r *http.Request) {
		r.Header.Set("Connection", "Upgrade")
		r.Header.Set("Upgrade", TunnelProtocol)
	})
	if err != nil {
		return nil, err
	}
	return upgraded(resp)
}

// upgraded is the connection of a 101 answer.
func upgraded(resp *http.Response) (io.ReadWriteCloser, error) {
	rwc, ok := resp.Body.(io.ReadWriteCloser)
	if resp.StatusCode != http.StatusSwitchingProtocols || !ok {
		resp.Body.Close()
		return nil, fmt.Errorf("%w: a tunnel was answered %s, not 101 Switching Protocols", ErrUnreachable, resp.Status)
	}
	return rwc, nil
}

// Upgraded returns the connection of an answer to a tunnel request, or
// an error if it is not a 101.
func Upgraded(resp *http.Response) (io.ReadWriteCloser, error) { return upgraded(resp) }

func (l local) Tunnel(ctx context.Context, op string, req any) (io.ReadWriteCloser, error) {
	e, ok := registry[op]
	if !ok || e.kind() != kindTunnel {
		return nil, fmt.Errorf("%w: unknown host tunnel %q", ErrInvalid, op)
	}
	return e.serveTunnel(context.WithoutCancel(ctx), l.h, req)
}
