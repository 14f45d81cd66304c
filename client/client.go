// Package client is the Go SDK for Vigil's REST API, used by the CLI and the
// tests.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/vigil-project/vigil/api"
)

// DefaultAddr is where `vigil agent --dev` listens by default.
const DefaultAddr = "https://127.0.0.1:7070"

// Client talks to a Vigil manager.
type Client struct {
	base  string
	token string
	http  *http.Client
	err   error // see Unusable
}

// Error is an error answer from the API.
type Error struct {
	Status  int
	Code    string
	Message string
}

func (e *Error) Error() string { return e.Message }

// IsNotFound reports whether err is the API's 404.
func IsNotFound(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Status == http.StatusNotFound
}

func (c *Client) do(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.send(ctx, method, path, body, "")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decode answer of %s %s: %w", method, path, err)
	}
	return nil
}

// send performs a request and turns non-2xx answers into *Error.
func (c *Client) send(ctx context.Context, method, path string, body any, accept string) (*http.Response, error) {
	if c.err != nil {
		return nil, c.err
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encode request: %w", err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, rd)
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot reach the vigil api at %s (is a vigil agent running? see 'vigil --help' for --config and VIGIL_CONFIG): %w", c.base, err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		return nil, errorFrom(req, resp)
	}
	return resp, nil
}

// errorFrom turns a non-2xx answer into *Error.
func errorFrom(req *http.Request, resp *http.Response) error {
	var e api.Error
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if json.Unmarshal(b, &e) != nil || e.Error == "" {
		e.Error = fmt.Sprintf("%s %s: %s", req.Method, req.URL.Path, resp.Status)
	}
	return &Error{Status: resp.StatusCode, Code: e.Code, Message: e.Error}
}

// CreateVM defines a VM (and starts it when req.Start).
func (c *Client) CreateVM(ctx context.Context, req api.VMCreateRequest) (api.VM, error) {
	var vm api.VM
	err := c.do(ctx, http.MethodPost, "/v1/vms", req, &vm)
	return vm, err
}

// VM returns one VM.
func (c *Client) VM(ctx context.Context, name string) (api.VM, error) {
	var vm api.VM
	err := c.do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(name), nil, &vm)
	return vm, err
}

// VMs lists every VM.
func (c *Client) VMs(ctx context.Context) ([]api.VM, error) {
	var vms []api.VM
	err := c.do(ctx, http.MethodGet, "/v1/vms", nil, &vms)
	return vms, err
}

// ListOptions narrows a listing of VMs: by host, by state, a page at a
// time (Limit VMs, continuing with the token the previous page gave).
type ListOptions struct {
	Host, State string
	Limit       int
	Continue    string
}

// VMsPage lists one page of the VMs opts select, and the token of the
// next page ("" after the last).
func (c *Client) VMsPage(ctx context.Context, opts ListOptions) ([]api.VM, string, error) {
	q := url.Values{}
	for k, v := range map[string]string{"host": opts.Host, "state": opts.State, "continue": opts.Continue} {
		if v != "" {
			q.Set(k, v)
		}
	}
	if opts.Limit > 0 {
		q.Set("limit", fmt.Sprint(opts.Limit))
	}
	resp, err := c.send(ctx, http.MethodGet, "/v1/vms?"+q.Encode(), nil, "")
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	var vms []api.VM
	if err := json.NewDecoder(resp.Body).Decode(&vms); err != nil {
		return nil, "", fmt.Errorf("decode the vm list: %w", err)
	}
	return vms, resp.Header.Get("Vigil-Continue"), nil
}

// AllVMs lists every VM opts select, reading page after page.
func (c *Client) AllVMs(ctx context.Context, opts ListOptions) ([]api.VM, error) {
	if opts.Limit == 0 {
		opts.Limit = 500
	}
	var all []api.VM
	for {
		vms, next, err := c.VMsPage(ctx, opts)
		if err != nil {
			return nil, err
		}
		all = append(all, vms...)
		if next == "" {
			return all, nil
		}
		if next == opts.Continue {
			return nil, fmt.Errorf("the api gave the same page token twice (%q): stopped listing", next)
		}
		opts.Continue = next
	}
}

// ChangeState starts, stops or restarts a VM and returns it afterwards.
func (c *Client) ChangeState(ctx context.Context, name string, req api.VMStateRequest) (api.VM, error) {
	var vm api.VM
	err := c.do(ctx, http.MethodPut, "/v1/vms/"+url.PathEscape(name)+"/state", req, &vm)
	return vm, err
}

// DeleteVM stops and removes a VM with its files. A VM with snapshots
// needs force.
func (c *Client) DeleteVM(ctx context.Context, name string, force ...bool) error {
	path := "/v1/vms/" + url.PathEscape(name)
	if len(force) > 0 && force[0] {
		path += "?force=true"
	}
	return c.do(ctx, http.MethodDelete, path, nil, nil)
}

// Exec runs a shell command in a VM's guest through its guest agent.
func (c *Client) Exec(ctx context.Context, vm string, req api.ExecRequest) (api.ExecResult, error) {
	var r api.ExecResult
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/exec", req, &r)
	return r, err
}

// Incidents lists a VM's crash and hang incidents, oldest first.
func (c *Client) Incidents(ctx context.Context, vm string) ([]api.Incident, error) {
	var incs []api.Incident
	err := c.do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(vm)+"/incidents", nil, &incs)
	return incs, err
}

// Fault injects a fault (panic, hang, agent-stop, kill) into a running VM.
func (c *Client) Fault(ctx context.Context, vm, kind string) error {
	return c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/fault", api.FaultRequest{Kind: kind}, nil)
}

// SetPolicy changes a VM's recovery policy.
func (c *Client) SetPolicy(ctx context.Context, vm string, p api.RecoveryPolicy) (api.VM, error) {
	var v api.VM
	err := c.do(ctx, http.MethodPut, "/v1/vms/"+url.PathEscape(vm)+"/policy", p, &v)
	return v, err
}

// CreateSnapshot takes a restore point of a VM.
func (c *Client) CreateSnapshot(ctx context.Context, vm string, req api.SnapshotCreateRequest) (api.Snapshot, error) {
	var s api.Snapshot
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/snapshots", req, &s)
	return s, err
}

// Snapshots lists a VM's snapshots with their space.
func (c *Client) Snapshots(ctx context.Context, vm string) (api.SnapshotList, error) {
	var l api.SnapshotList
	err := c.do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(vm)+"/snapshots", nil, &l)
	return l, err
}

// RevertSnapshot returns a VM to a snapshot.
func (c *Client) RevertSnapshot(ctx context.Context, vm, snap string) (api.VM, error) {
	var v api.VM
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/snapshots/"+url.PathEscape(snap)+"/revert", nil, &v)
	return v, err
}

// DeleteSnapshot removes one snapshot of a VM.
func (c *Client) DeleteSnapshot(ctx context.Context, vm, snap string) error {
	return c.do(ctx, http.MethodDelete, "/v1/vms/"+url.PathEscape(vm)+"/snapshots/"+url.PathEscape(snap), nil, nil)
}

// Hosts lists the hosts.
func (c *Client) Hosts(ctx context.Context) ([]api.Host, error) {
	var hs []api.Host
	err := c.do(ctx, http.MethodGet, "/v1/hosts", nil, &hs)
	return hs, err
}

// Migrate moves a VM to another host (live if it runs); to may be empty
// to let the scheduler choose.
func (c *Client) Migrate(ctx context.Context, vm, to string) (api.VM, error) {
	var v api.VM
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/migrate", api.MigrateRequest{To: to}, &v)
	return v, err
}

// Metrics returns GET /metrics: the cluster in Prometheus' text format.
func (c *Client) Metrics(ctx context.Context) ([]byte, error) {
	resp, err := c.send(ctx, http.MethodGet, "/metrics", nil, "text/plain")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}

// Protect gives a VM a synchronized standby on another host.
func (c *Client) Protect(ctx context.Context, vm string, req api.ProtectRequest) (api.VM, error) {
	var v api.VM
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/protect", req, &v)
	return v, err
}

// Unprotect ends a VM's protection.
func (c *Client) Unprotect(ctx context.Context, vm string) (api.VM, error) {
	var v api.VM
	err := c.do(ctx, http.MethodPost, "/v1/vms/"+url.PathEscape(vm)+"/unprotect", nil, &v)
	return v, err
}

// DrainHost keeps new VMs off a host and moves its VMs away.
func (c *Client) DrainHost(ctx context.Context, host string) (api.DrainResult, error) {
	var r api.DrainResult
	err := c.do(ctx, http.MethodPost, "/v1/hosts/"+url.PathEscape(host)+"/drain", nil, &r)
	return r, err
}

// EnableHost lets VMs be placed on a drained host again.
func (c *Client) EnableHost(ctx context.Context, host string) error {
	return c.do(ctx, http.MethodPost, "/v1/hosts/"+url.PathEscape(host)+"/enable", nil, nil)
}

// JoinToken asks the manager for a token that admits one new host.
func (c *Client) JoinToken(ctx context.Context, host string) (api.JoinToken, error) {
	var r api.JoinToken
	var body any
	if host != "" {
		body = api.JoinTokenRequest{Host: host}
	}
	err := c.do(ctx, http.MethodPost, "/v1/hosts/join-tokens", body, &r)
	return r, err
}

// CreateToken makes an API token (admin).
func (c *Client) CreateToken(ctx context.Context, req api.TokenCreateRequest) (api.TokenCreated, error) {
	var r api.TokenCreated
	err := c.do(ctx, http.MethodPost, "/v1/tokens", req, &r)
	return r, err
}

// SignInLink asks for a code of a dashboard sign-in link, which gives
// whoever opens it (once, within minutes) a token of this client's role.
func (c *Client) SignInLink(ctx context.Context) (api.SignInLink, error) {
	var r api.SignInLink
	err := c.do(ctx, http.MethodPost, "/v1/ui/links", nil, &r)
	return r, err
}

// Usage is a running VM's usage history (what the dashboard's charts draw).
func (c *Client) Usage(ctx context.Context, vm string) (api.UsageHistory, error) {
	var r api.UsageHistory
	err := c.do(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(vm)+"/usage", nil, &r)
	return r, err
}

// Tokens lists the API tokens (admin).
func (c *Client) Tokens(ctx context.Context) ([]api.TokenInfo, error) {
	var r []api.TokenInfo
	err := c.do(ctx, http.MethodGet, "/v1/tokens", nil, &r)
	return r, err
}

// RevokeToken deletes an API token (admin).
func (c *Client) RevokeToken(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/tokens/"+url.PathEscape(name), nil, nil)
}

// Audit lists the last limit audit entries.
func (c *Client) Audit(ctx context.Context, limit int) ([]api.AuditEntry, error) {
	var r []api.AuditEntry
	err := c.do(ctx, http.MethodGet, fmt.Sprintf("/v1/audit?limit=%d", limit), nil, &r)
	return r, err
}

// Raw performs an authenticated request and returns the status and the
// body, whatever the status (for 'vigil api').
func (c *Client) Raw(ctx context.Context, method, path string, body io.Reader) (int, []byte, error) {
	if c.err != nil {
		return 0, nil, c.err
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return 0, nil, fmt.Errorf("build request: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("cannot reach the vigil api at %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	return resp.StatusCode, b, err
}

// Console copies a VM's serial console to w; with follow, until ctx ends.
func (c *Client) Console(ctx context.Context, name string, follow bool, w io.Writer) error {
	resp, err := c.send(ctx, http.MethodGet, fmt.Sprintf("/v1/vms/%s/console?follow=%t", url.PathEscape(name), follow), nil, "")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(w, resp.Body)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// EventStream is an open stream of events.
type EventStream struct {
	body io.Closer
	sc   *bufio.Scanner
}

// Events opens the event stream. since resumes after an event's Seq; vm, if
// set, keeps only that VM's events; follow keeps the stream open.
func (c *Client) Events(ctx context.Context, since uint64, vm string, follow bool) (*EventStream, error) {
	q := url.Values{}
	q.Set("since", fmt.Sprint(since))
	q.Set("follow", fmt.Sprint(follow))
	if vm != "" {
		q.Set("vm", vm)
	}
	resp, err := c.send(ctx, http.MethodGet, "/v1/events?"+q.Encode(), nil, "application/x-ndjson")
	if err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	return &EventStream{body: resp.Body, sc: sc}, nil
}

// Next returns the next event; io.EOF when the stream ends.
func (s *EventStream) Next() (api.Event, error) {
	for s.sc.Scan() {
		var e api.Event
		if err := json.Unmarshal(s.sc.Bytes(), &e); err != nil {
			return e, fmt.Errorf("decode event: %w", err)
		}
		if e.Seq == 0 {
			continue // keep-alive
		}
		return e, nil
	}
	if err := s.sc.Err(); err != nil {
		return api.Event{}, err
	}
	return api.Event{}, io.EOF
}

// Close ends the stream.
func (s *EventStream) Close() error { return s.body.Close() }

// WaitGuest blocks until the VM's guest agent has sent a heartbeat in its
// current boot, and returns the VM then.
func (c *Client) WaitGuest(ctx context.Context, name string) (api.VM, error) {
	// Subscribe before looking, so a heartbeat between the two is not missed.
	s, err := c.Events(ctx, ^uint64(0)>>1, name, true)
	if err != nil {
		return api.VM{}, err
	}
	defer s.Close()
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	events := make(chan struct{}, 1)
	go func() {
		defer close(events)
		for {
			e, err := s.Next()
			if err != nil {
				return
			}
			if e.Type == "vm.guest-ready" || e.Type == "vm.exited" || e.Type == "vm.crashed" || e.Type == "vm.state" {
				select {
				case events <- struct{}{}:
				default:
				}
			}
		}
	}()
	for {
		vm, err := c.VM(ctx, name)
		if err != nil {
			return vm, err
		}
		if vm.Guest != nil {
			return vm, nil
		}
		switch vm.State {
		case api.StateStopped, api.StateCrashed, api.StateFailed:
			return vm, fmt.Errorf("vm %s is %s: its guest will not answer (%s)", name, vm.State, vm.Message)
		}
		// Events wake us at once; a timer re-checks anyway, since with several
		// managers the event may reach another one than ours.
		select {
		case _, ok := <-events:
			if !ok {
				if ctx.Err() != nil {
					return vm, ctx.Err()
				}
				return vm, fmt.Errorf("wait for the guest of %s: the event stream ended", name)
			}
		case <-time.After(500 * time.Millisecond):
		case <-ctx.Done():
			return vm, ctx.Err()
		}
	}
}

// ImportImage uploads an image file under name. size, when known (≥ 0),
// lets the server refuse an upload it has no room for before it starts.
func (c *Client) ImportImage(ctx context.Context, name string, r io.Reader, size int64) (api.Image, error) {
	if c.err != nil {
		return api.Image{}, c.err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, c.base+"/v1/images/"+url.PathEscape(name), r)
	if err != nil {
		return api.Image{}, fmt.Errorf("build request: %w", err)
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return api.Image{}, fmt.Errorf("upload image to %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return api.Image{}, errorFrom(req, resp)
	}
	var img api.Image
	if err := json.NewDecoder(resp.Body).Decode(&img); err != nil {
		return img, fmt.Errorf("decode answer of image import: %w", err)
	}
	return img, nil
}

// Images lists the imported images.
func (c *Client) Images(ctx context.Context) ([]api.Image, error) {
	var out []api.Image
	err := c.do(ctx, http.MethodGet, "/v1/images", nil, &out)
	return out, err
}

// DeleteImage removes an image no VM uses.
func (c *Client) DeleteImage(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/images/"+url.PathEscape(name), nil, nil)
}

// Reconfigure changes what a VM's guest gets at its next boot (new
// cloud-init user-data, an ejected installer CD-ROM).
func (c *Client) Reconfigure(ctx context.Context, name string, req api.VMConfigRequest) (api.VM, error) {
	var vm api.VM
	err := c.do(ctx, http.MethodPatch, "/v1/vms/"+url.PathEscape(name), req, &vm)
	return vm, err
}

// Screenshot returns a PNG of a VM's display.
func (c *Client) Screenshot(ctx context.Context, name string) ([]byte, error) {
	resp, err := c.send(ctx, http.MethodGet, "/v1/vms/"+url.PathEscape(name)+"/screenshot", nil, "image/png")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(io.LimitReader(resp.Body, 64<<20))
}

// VNC opens a tunnel to a VM's VNC server through the API: what is written
// goes to the VM's VNC server and what it sends can be read, until Close.
func (c *Client) VNC(ctx context.Context, name string) (io.ReadWriteCloser, error) {
	if c.err != nil {
		return nil, c.err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/v1/vms/"+url.PathEscape(name)+"/vnc", nil)
	if err != nil {
		return nil, fmt.Errorf("build request: %w", err)
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", tunnelProtocol)
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot reach the vigil api at %s: %w", c.base, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer resp.Body.Close()
		return nil, errorFrom(req, resp)
	}
	rwc, ok := resp.Body.(io.ReadWriteCloser)
	if !ok {
		resp.Body.Close()
		return nil, errors.New("the api answered 101 but gave no connection")
	}
	return rwc, nil
}

// tunnelProtocol is the Upgrade token of the API's tunnels.
const tunnelProtocol = "vigil-tunnel"

// CreateNetwork defines a network.
func (c *Client) CreateNetwork(ctx context.Context, req api.NetworkCreateRequest) (api.Network, error) {
	var out api.Network
	err := c.do(ctx, http.MethodPost, "/v1/networks", req, &out)
	return out, err
}

// Networks lists the networks.
func (c *Client) Networks(ctx context.Context) ([]api.Network, error) {
	var out []api.Network
	err := c.do(ctx, http.MethodGet, "/v1/networks", nil, &out)
	return out, err
}

// Network reports one network.
func (c *Client) Network(ctx context.Context, name string) (api.Network, error) {
	var out api.Network
	err := c.do(ctx, http.MethodGet, "/v1/networks/"+url.PathEscape(name), nil, &out)
	return out, err
}

// DeleteNetwork removes a network no VM uses.
func (c *Client) DeleteNetwork(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/networks/"+url.PathEscape(name), nil, nil)
}
