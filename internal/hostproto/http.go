package hostproto

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// The wire: POST /v1/host/ops/{op} with the request as JSON answers 200 and
// the answer as JSON, or an error status (from the kinds table) and
// wireError. POST /v1/host/streams/{op} answers 200 and the stream, or an
// error before the first byte. Tunnels are in tunnel.go.
const (
	opsPath     = "/v1/host/ops/"
	streamsPath = "/v1/host/streams/"
	// timeoutHeader carries the caller's remaining time, so the host stops
	// where the caller stops waiting; clocks need not agree.
	timeoutHeader = "Vigil-Timeout-Ms"
	maxRequest    = 1 << 20
)

// wireError is how an error crosses the wire.
type wireError struct {
	Error string `json:"error"`
	Kind  string `json:"kind"`
}

// Serve answers the declared operations on h. Authentication is the
// caller's (wrap the handler). A host operation, once accepted, runs to its
// end or its time limit even if the caller goes away: a migration or a
// save half done because a manager died is worse than one finished.
func Serve(h Handler, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+opsPath+"{op}", func(w http.ResponseWriter, r *http.Request) {
		e, req, ok := decodeRequest(w, r, kindCall)
		if !ok {
			return
		}
		timeout := e.timeout
		if ms, err := strconv.ParseInt(r.Header.Get(timeoutHeader), 10, 64); err == nil && ms > 0 {
			timeout = time.Duration(ms) * time.Millisecond
		}
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), timeout)
		defer cancel()
		resp, err := e.serve(ctx, h, req)
		if err == nil {
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(resp)
			return
		}
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil {
			err = fmt.Errorf("%w after %s: %v", ErrTimeout, timeout, err)
		}
		log.Debug("host operation failed", "op", e.name, "err", err)
		writeError(w, err)
	})
	mux.HandleFunc("POST "+streamsPath+"{op}", func(w http.ResponseWriter, r *http.Request) {
		e, req, ok := decodeRequest(w, r, kindStream)
		if !ok {
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fw := &flushWriter{w: w}
		if err := e.serveStream(r.Context(), h, req, fw); err != nil && !fw.wrote {
			writeError(w, err)
		}
	})
	mux.HandleFunc("POST "+tunnelsPath+"{op}", func(w http.ResponseWriter, r *http.Request) {
		serveTunnel(h, w, r)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, fmt.Errorf("%w: no such host endpoint %s %s", ErrInvalid, r.Method, r.URL.Path))
	})
	return mux
}

func decodeRequest(w http.ResponseWriter, r *http.Request, kind opKind) (*entry, any, bool) {
	name := r.PathValue("op")
	e, ok := registry[name]
	if !ok || e.kind() != kind {
		writeError(w, fmt.Errorf("%w: unknown host operation %q (the manager and this host agent may be of different versions)", ErrInvalid, name))
		return nil, nil, false
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxRequest))
	if err != nil {
		writeError(w, fmt.Errorf("%w: read request: %v", ErrInvalid, err))
		return nil, nil, false
	}
	req, err := e.decode(b)
	if err != nil {
		writeError(w, fmt.Errorf("%s: %w", name, err))
		return nil, nil, false
	}
	return e, req, true
}

func writeError(w http.ResponseWriter, err error) {
	kind := KindOf(err)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(statusOfKind(kind))
	json.NewEncoder(w).Encode(wireError{Error: err.Error(), Kind: kind})
}

type flushWriter struct {
	w     http.ResponseWriter
	wrote bool
}

func (f *flushWriter) Write(p []byte) (int, error) {
	f.wrote = true
	n, err := f.w.Write(p)
	if fl, ok := f.w.(http.Flusher); ok {
		fl.Flush()
	}
	return n, err
}

// Client is a Conn to a host agent over HTTP.
type Client struct {
	base string // e.g. https://10.0.0.5:7071
	http *http.Client
	// auth, if set, adds credentials to every request.
	auth func(*http.Request)
}

// NewClient returns a Conn to the host agent at base (scheme://host:port).
func NewClient(base string, hc *http.Client, auth func(*http.Request)) *Client {
	if hc == nil {
		hc = &http.Client{}
	}
	return &Client{base: strings.TrimRight(base, "/"), http: hc, auth: auth}
}

// Call runs op on the host; see Conn.
func (c *Client) Call(ctx context.Context, op string, req, resp any) error {
	resp2, err := c.do(ctx, opsPath+url.PathEscape(op), req, nil)
	if err != nil {
		return err
	}
	defer resp2.Body.Close()
	if resp == nil {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp2.Body, 64<<20)).Decode(resp); err != nil {
		return fmt.Errorf("%w: bad answer to %s: %v", ErrUnreachable, op, err)
	}
	return nil
}

// Stream runs a stream op on the host and copies its output to w until the
// stream or ctx ends.
func (c *Client) Stream(ctx context.Context, op string, req any, w io.Writer) error {
	resp, err := c.do(ctx, streamsPath+url.PathEscape(op), req, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(w, resp.Body)
	if ctx.Err() != nil {
		return nil // the caller stopped following
	}
	return err
}

// do posts body to path (edit, if set, adjusts the request) and returns a
// 200 or 101 answer, or the host's error.
func (c *Client) do(ctx context.Context, path string, body any, edit func(*http.Request)) (*http.Response, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, fmt.Errorf("%w: encode request: %v", ErrInvalid, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+path, bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	req.Header.Set("Content-Type", "application/json")
	if d, ok := ctx.Deadline(); ok {
		req.Header.Set(timeoutHeader, strconv.FormatInt(max(time.Until(d).Milliseconds(), 1), 10))
	}
	if c.auth != nil {
		c.auth(req)
	}
	if edit != nil {
		edit(req)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w: %w", ErrTimeout, ctx.Err())
		}
		return nil, fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusSwitchingProtocols {
		return resp, nil
	}
	defer resp.Body.Close()
	var we wireError
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&we); err != nil || we.Error == "" {
		if resp.StatusCode == http.StatusUnauthorized {
			return nil, fmt.Errorf("%w (%s)", ErrUnauthorized, resp.Status)
		}
		return nil, fmt.Errorf("%w: %s answered %s", ErrUnreachable, path, resp.Status)
	}
	return nil, errorOfKind(we.Kind, we.Error)
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }
