package agent

import (
	"math/rand/v2"
	"time"

	"github.com/vigil-project/vigil/internal/hostproto"
)

// reports decides whether a heartbeat carries every VM's status or says
// Same (the rule is hostproto's: report.go). Only the heartbeat loop uses
// it.
type reports struct {
	last    uint64              // the number of the last full report made
	taken   hostproto.Heartbeat // the last full report a manager took
	manager string              // the manager that took it
	at      time.Time           // when it was sent
	same    bool                // that manager takes Same
}

// next is the heartbeat to send to the manager at url for report: Same
// when that manager took a full report less than FullReportEvery ago and
// nothing a decision reads changed since; otherwise the report in full,
// numbered. A host with a protected VM always reports in full: its
// checkpoint figures make the VM's recovery point, which must be current.
func (r *reports) next(url string, report hostproto.Heartbeat, now time.Time) hostproto.Heartbeat {
	if r.same && r.manager == url && r.taken.Report != 0 && now.Sub(r.at) < hostproto.FullReportEvery &&
		!protects(report) && hostproto.SameReport(r.taken, report) {
		return hostproto.Heartbeat{Info: report.Info, Events: report.Events, Same: r.taken.Report, Guests: hostproto.Ticks(report.Statuses)}
	}
	if r.last == 0 {
		// Numbers start anywhere: a report number of an earlier run of
		// this agent is not taken for one of this run.
		r.last = rand.Uint64() >> 1
	}
	r.last++
	report.Report = r.last
	return report
}

// took records that the manager at url took hb, sent at sent, and whether
// its answer said it takes Same.
func (r *reports) took(url string, hb hostproto.Heartbeat, sent time.Time, same bool) {
	r.same = same && r.manager == url
	if hb.Same != 0 {
		return
	}
	hb.Events = nil
	r.taken, r.manager, r.at, r.same = hb, url, sent, same
}

// forget makes the next heartbeat a full report.
func (r *reports) forget() {
	r.taken, r.manager, r.same = hostproto.Heartbeat{}, "", false
}

func protects(report hostproto.Heartbeat) bool {
	for _, s := range report.Statuses {
		if s.Protection != nil {
			return true
		}
	}
	return false
}
