package client

import (
	"context"
	"net/http"
	"net/url"

	"github.com/vigil-project/vigil/api"
)

// BootImages lists the host images stateless hosts boot.
func (c *Client) BootImages(ctx context.Context) ([]api.BootImage, error) {
	var out []api.BootImage
	err := c.do(ctx, http.MethodGet, "/v1/boot/images", nil, &out)
	return out, err
}

// SetBootProfile creates or changes a boot profile.
func (c *Client) SetBootProfile(ctx context.Context, p api.BootProfile) (api.BootProfile, error) {
	var out api.BootProfile
	err := c.do(ctx, http.MethodPut, "/v1/boot/profiles/"+url.PathEscape(p.Name), p, &out)
	return out, err
}

// BootProfiles lists the boot profiles.
func (c *Client) BootProfiles(ctx context.Context) ([]api.BootProfile, error) {
	var out []api.BootProfile
	err := c.do(ctx, http.MethodGet, "/v1/boot/profiles", nil, &out)
	return out, err
}

// BootMachines lists the machines that booted from the boot service.
func (c *Client) BootMachines(ctx context.Context) ([]api.BootMachine, error) {
	var out []api.BootMachine
	err := c.do(ctx, http.MethodGet, "/v1/boot/machines", nil, &out)
	return out, err
}

// AdmitMachine lets a quarantined machine join as a host.
func (c *Client) AdmitMachine(ctx context.Context, mac string, req api.BootAdmitRequest) (api.BootMachine, error) {
	var out api.BootMachine
	err := c.do(ctx, http.MethodPost, "/v1/boot/machines/"+url.PathEscape(mac)+"/admit", req, &out)
	return out, err
}

// QuarantineMachine takes a machine's admission back.
func (c *Client) QuarantineMachine(ctx context.Context, mac string) (api.BootMachine, error) {
	var out api.BootMachine
	err := c.do(ctx, http.MethodPost, "/v1/boot/machines/"+url.PathEscape(mac)+"/quarantine", nil, &out)
	return out, err
}

// SetMachinePower records how the manager resets a machine.
func (c *Client) SetMachinePower(ctx context.Context, mac, power string) (api.BootMachine, error) {
	var out api.BootMachine
	err := c.do(ctx, http.MethodPut, "/v1/boot/machines/"+url.PathEscape(mac)+"/power", api.BootPowerRequest{Power: power}, &out)
	return out, err
}

// StartRollout moves a profile's hosts to another image, one at a time.
func (c *Client) StartRollout(ctx context.Context, profile string, req api.BootRolloutRequest) (api.BootRollout, error) {
	var out api.BootRollout
	err := c.do(ctx, http.MethodPost, "/v1/boot/rollouts/"+url.PathEscape(profile), req, &out)
	return out, err
}

// Rollout reports a profile's last rollout.
func (c *Client) Rollout(ctx context.Context, profile string) (api.BootRollout, error) {
	var out api.BootRollout
	err := c.do(ctx, http.MethodGet, "/v1/boot/rollouts/"+url.PathEscape(profile), nil, &out)
	return out, err
}

// ForgetMachine removes a machine's record and address lease.
func (c *Client) ForgetMachine(ctx context.Context, mac string) error {
	return c.do(ctx, http.MethodDelete, "/v1/boot/machines/"+url.PathEscape(mac), nil, nil)
}

// SetBootRule creates or replaces a boot rule.
func (c *Client) SetBootRule(ctx context.Context, r api.BootRule) (api.BootRule, error) {
	var out api.BootRule
	err := c.do(ctx, http.MethodPut, "/v1/boot/rules/"+url.PathEscape(r.Name), r, &out)
	return out, err
}

// BootRules lists the boot rules in the order they are tried.
func (c *Client) BootRules(ctx context.Context) ([]api.BootRule, error) {
	var out []api.BootRule
	err := c.do(ctx, http.MethodGet, "/v1/boot/rules", nil, &out)
	return out, err
}

// DeleteBootRule removes a boot rule (machines it admitted stay admitted).
func (c *Client) DeleteBootRule(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/boot/rules/"+url.PathEscape(name), nil, nil)
}
