package bootsvc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/store"
)

func ruleKey(name string) string { return "boot/rules/" + name }

// macPrefixRE is a MAC prefix rule: whole bytes, then *.
var macPrefixRE = regexp.MustCompile(`^([0-9a-f]{2}:){1,5}\*$`)

// maxRules bounds the rules (each quarantined machine's request reads them).
const maxRules = 256

// normalRule checks r and puts its matchers in the form machines are
// compared in.
func normalRule(r *api.BootRule) error {
	if !nameRE.MatchString(r.Name) {
		return fmt.Errorf("%w: rule name %q: use lower-case letters, digits and dashes", ErrInvalid, r.Name)
	}
	r.MAC = strings.ToLower(strings.TrimSpace(r.MAC))
	switch {
	case r.MAC == "":
	case strings.HasSuffix(r.MAC, "*"):
		if !macPrefixRE.MatchString(r.MAC) {
			return fmt.Errorf("%w: --mac %q: give an address (52:54:00:12:34:56) or whole leading bytes then * (52:54:00:*)", ErrInvalid, r.MAC)
		}
	default:
		mac, err := NormalMAC(r.MAC)
		if err != nil {
			return err
		}
		r.MAC = mac
	}
	r.UUID = strings.ToLower(strings.TrimSpace(r.UUID))
	if r.UUID != "" && !uuidRE.MatchString(r.UUID) {
		return fmt.Errorf("%w: --uuid %q is not a UUID (like 6f1c2d3e-0000-4000-8000-0000000000b1)", ErrInvalid, r.UUID)
	}
	r.Vendor = strings.TrimSpace(r.Vendor)
	if r.Vendor != "" && cleanClaim(r.Vendor) == "" {
		return fmt.Errorf("%w: --vendor %q: printable text of at most 64 characters", ErrInvalid, r.Vendor)
	}
	if r.MAC == "" && r.UUID == "" && r.Vendor == "" {
		return fmt.Errorf("%w: rule %s matches nothing: give --mac, --uuid or --vendor", ErrInvalid, r.Name)
	}
	one := r.UUID != "" || (r.MAC != "" && !strings.HasSuffix(r.MAC, "*"))
	if r.HostName != "" && !one {
		return fmt.Errorf("%w: --host-name names one machine: use it with an exact --mac or --uuid (a rule for many names them --host-prefix-XXXXXX)", ErrInvalid)
	}
	if r.HostName != "" && !nameRE.MatchString(r.HostName) {
		return fmt.Errorf("%w: host name %q: it must be a DNS label", ErrInvalid, r.HostName)
	}
	if r.HostPrefix != "" && (len(r.HostPrefix) > maxPrefix || !nameRE.MatchString(r.HostPrefix)) {
		return fmt.Errorf("%w: host prefix %q: lower-case letters, digits and dashes, at most %d", ErrInvalid, r.HostPrefix, maxPrefix)
	}
	if r.Rank < 0 {
		return fmt.Errorf("%w: rank %d is negative", ErrInvalid, r.Rank)
	}
	if r.HostName == "" && r.HostPrefix == "" && len(r.Profile) > maxPrefix {
		return fmt.Errorf("%w: hosts would be named %s-XXXXXX, longer than a DNS label: give --host-prefix (at most %d characters)", ErrInvalid, r.Profile, maxPrefix)
	}
	return nil
}

// maxPrefix keeps PREFIX-XXXXXX a DNS label (63 characters).
const maxPrefix = 63 - 7

// cleanClaim is s if it is printable ASCII of at most 64 characters
// (SMBIOS strings as a machine reports them), else empty.
func cleanClaim(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 64 {
		return ""
	}
	for _, c := range s {
		if c < 0x20 || c > 0x7e {
			return ""
		}
	}
	return s
}

// SetRule creates or replaces a rule. Without a rank it goes after the
// others (the highest rank plus 10).
func (r *Registry) SetRule(ctx context.Context, rule api.BootRule) (api.BootRule, error) {
	if err := normalRule(&rule); err != nil {
		return api.BootRule{}, err
	}
	if _, err := r.Profile(ctx, rule.Profile); err != nil {
		return api.BootRule{}, err
	}
	rules, err := r.Rules(ctx)
	if err != nil {
		return api.BootRule{}, err
	}
	exists := slices.ContainsFunc(rules, func(o api.BootRule) bool { return o.Name == rule.Name })
	if !exists && len(rules) >= maxRules {
		return api.BootRule{}, fmt.Errorf("%w: %d rules already: delete some ('vigil boot rule delete NAME')", ErrInvalid, len(rules))
	}
	if rule.Rank == 0 {
		for _, o := range rules {
			if o.Name != rule.Name {
				rule.Rank = max(rule.Rank, o.Rank+10)
			}
		}
		rule.Rank = max(rule.Rank, 10)
	}
	rule.CreatedAt = r.now()
	if err := r.Store.Put(ctx, ruleKey(rule.Name), rule); err != nil {
		return api.BootRule{}, err
	}
	return rule, nil
}

// Rules lists the rules in the order they are tried.
func (r *Registry) Rules(ctx context.Context) ([]api.BootRule, error) {
	out, err := listOf[api.BootRule](ctx, r.Store, "boot/rules/")
	if err != nil {
		return nil, err
	}
	slices.SortStableFunc(out, func(a, b api.BootRule) int {
		if a.Rank != b.Rank {
			return a.Rank - b.Rank
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out, nil
}

// DeleteRule removes a rule; machines it admitted stay admitted.
func (r *Registry) DeleteRule(ctx context.Context, name string) error {
	var rule api.BootRule
	if _, err := r.Store.Get(ctx, ruleKey(name), &rule); errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("%w: no boot rule %q: see 'vigil boot rule list'", ErrNotFound, name)
	} else if err != nil {
		return err
	}
	return r.Store.Delete(ctx, ruleKey(name))
}

// matches tells whether every matcher rule gives matches machine m.
func matches(rule api.BootRule, m api.BootMachine) bool {
	if rule.MAC != "" {
		if p, ok := strings.CutSuffix(rule.MAC, "*"); ok {
			if !strings.HasPrefix(m.MAC, p) {
				return false
			}
		} else if rule.MAC != m.MAC {
			return false
		}
	}
	if rule.UUID != "" && rule.UUID != m.UUID {
		return false
	}
	if rule.Vendor != "" && !strings.EqualFold(rule.Vendor, m.Vendor) {
		return false
	}
	return true
}

// ruleHostName is the name rule gives machine m.
func ruleHostName(rule api.BootRule, m api.BootMachine) string {
	if rule.HostName != "" {
		return rule.HostName
	}
	prefix := rule.HostPrefix
	if prefix == "" {
		prefix = rule.Profile
	}
	return prefix + "-" + strings.ReplaceAll(m.MAC[9:], ":", "")
}

// applyRules admits quarantined machine m by the first rule that matches
// it, unless an operator holds it. If that rule's host name is taken (by
// another machine, or a host that did not boot from the network), the
// machine stays quarantined and says why (its last error): falling
// through to a later rule would give it a profile nobody meant for it.
// It returns m as it now is.
func (r *Registry) applyRules(ctx context.Context, m api.BootMachine) (api.BootMachine, error) {
	if m.State != api.MachineQuarantined || m.Held {
		return m, nil
	}
	rules, err := r.Rules(ctx)
	if err != nil || len(rules) == 0 {
		return m, err
	}
	for _, rule := range rules {
		if !matches(rule, m) {
			continue
		}
		name := ruleHostName(rule, m)
		if !nameRE.MatchString(name) {
			return r.noteProblem(ctx, m, fmt.Sprintf("rule %s: host name %q is not a DNS label", rule.Name, name))
		}
		got, admitted, err := r.admitAs(ctx, m.MAC, name, func(cur *api.BootMachine) bool {
			if cur.State != api.MachineQuarantined || cur.Held {
				return false // an operator acted meanwhile: theirs stands
			}
			cur.State, cur.Profile, cur.Rule = api.MachineAdmitted, rule.Profile, rule.Name
			return true
		})
		if err != nil || admitted || got.State != api.MachineQuarantined || got.Held {
			return got, err
		}
		return r.noteProblem(ctx, got, fmt.Sprintf("rule %s: host name %s is taken (by another machine, or by a host that did not boot from the network)", rule.Name, name))
	}
	return m, nil
}

// noteProblem records msg as machine m's last problem, once.
func (r *Registry) noteProblem(ctx context.Context, m api.BootMachine, msg string) (api.BootMachine, error) {
	if m.LastError == msg {
		return m, nil
	}
	return r.update(ctx, m.MAC, func(cur *api.BootMachine) error {
		cur.LastError, cur.LastErrorAt = msg, r.now()
		return nil
	})
}

func hostNameKey(name string) string { return "boot/hostnames/" + name }

// hostNameIndex is boot/hostnames/NAME: the machine that has the name.
type hostNameIndex struct {
	MAC string `json:"mac"`
}

// admitAs gives machine mac host name name if set agrees (set changes the
// record, or says no), in one transaction with the name's index: two
// machines never hold one name, however many boot services and operators
// act at once. The index of a name its machine no longer has is stale and
// taken over. It reports whether the machine was admitted; false with no
// error: the name is taken, or set said no.
func (r *Registry) admitAs(ctx context.Context, mac, name string, set func(m *api.BootMachine) bool) (api.BootMachine, bool, error) {
	for attempt := 0; attempt < 16; attempt++ {
		var m api.BootMachine
		mrev, err := r.Store.Get(ctx, machineKey(mac), &m)
		if errors.Is(err, store.ErrNotFound) {
			m, mrev = api.BootMachine{MAC: mac, State: api.MachineQuarantined, FirstSeen: r.now()}, 0
		} else if err != nil {
			return m, false, err
		}
		var idx hostNameIndex
		irev, err := r.Store.Get(ctx, hostNameKey(name), &idx)
		switch {
		case errors.Is(err, store.ErrNotFound):
			irev = 0
			// Not indexed: a host registered otherwise, or a machine
			// admitted before the index existed, may have it.
			if free, err := r.nameFree(ctx, name, mac); err != nil || !free {
				return m, false, err
			}
		case err != nil:
			return m, false, err
		case idx.MAC != mac:
			var other api.BootMachine
			if _, err := r.Store.Get(ctx, machineKey(idx.MAC), &other); err == nil && other.HostName == name {
				return m, false, nil
			} else if err != nil && !errors.Is(err, store.ErrNotFound) {
				return m, false, err
			}
		}
		if !set(&m) {
			return m, false, nil
		}
		m.HostName = name
		err = r.Store.PutPair(ctx, machineKey(mac), mrev, m, hostNameKey(name), irev, hostNameIndex{MAC: mac})
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		if err != nil {
			return m, false, err
		}
		return m, true, nil
	}
	return api.BootMachine{}, false, errors.New("host name: too much contention, try again")
}

// nameFree tells whether host name may be machine mac's, by a look at
// every machine: no other machine has it, and no host registered
// otherwise does (a network-booted host's tokens are bound to its name:
// it would take that host's place).
func (r *Registry) nameFree(ctx context.Context, name, mac string) (bool, error) {
	ms, err := r.Machines(ctx)
	if err != nil {
		return false, err
	}
	booted := false
	for _, o := range ms {
		if o.HostName == name {
			if o.MAC != mac {
				return false, nil
			}
			booted = true
		}
	}
	if booted {
		return true, nil
	}
	var host json.RawMessage
	if _, err := r.Store.Get(ctx, "hosts/"+name, &host); err == nil {
		return false, nil
	} else if !errors.Is(err, store.ErrNotFound) {
		return false, err
	}
	return true, nil
}
