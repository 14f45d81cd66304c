package qemu

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/vigil-project/vigil/internal/qemu/qmp"
)

// Output commit: a protected VM's outgoing packets are held in QEMU until
// the checkpoint that produced them is committed on the secondary (these
// kernels have no sch_plug qdisc to hold them on the host). Each checkpoint
// adds, while the guest is stopped at its switchover, a new filter-buffer
// on every netdev; the guest's packets from then on go into it (QEMU hands
// an rx packet to the filter added last first). Releasing a checkpoint's
// filters delivers what they hold, in order, and leaves the newer ones
// holding. Checked on QEMU 7.2: object-del of a filter-buffer flushes it;
// one holds at most 10,000 packets (more are dropped, which the guest's
// TCP recovers from like any loss).

// holdPrefix names the filters; holdInterval is the longest timer QEMU
// takes (uint32 µs, ~71 min of guest time): the filter is meant never to
// release by itself.
const (
	holdPrefix   = "vigil-hold-"
	holdInterval = 4294967295
)

// Netdevs are the IDs of the machine's network backends.
func (m Machine) Netdevs() []string {
	if len(m.NICs) == 0 {
		return []string{"net0"}
	}
	out := make([]string, len(m.NICs))
	for i := range m.NICs {
		out[i] = "net" + strconv.Itoa(i)
	}
	return out
}

func holdID(tag uint64, netdev string) string {
	return holdPrefix + strconv.FormatUint(tag, 10) + "-" + netdev
}

// HoldOutput starts holding the guest's outgoing packets on netdevs in new
// filters tagged tag. Run it while the guest is stopped, so the packets
// before and after that instant go to different filters.
func HoldOutput(ctx context.Context, mon *qmp.Monitor, netdevs []string, tag uint64) error {
	for i, nd := range netdevs {
		args := map[string]any{"qom-type": "filter-buffer", "id": holdID(tag, nd), "netdev": nd, "queue": "rx", "interval": holdInterval}
		if err := mon.Run(ctx, "object-add", args, nil); err != nil {
			for _, done := range netdevs[:i] {
				mon.Run(ctx, "object-del", map[string]any{"id": holdID(tag, done)}, nil)
			}
			return fmt.Errorf("hold the guest's output on %s: %w", nd, err)
		}
	}
	return nil
}

// ReleaseOutput delivers what the filters with tags below tag hold (all of
// them with tag 0), oldest first.
func ReleaseOutput(ctx context.Context, mon *qmp.Monitor, below uint64) error {
	var objs []struct {
		Name string `json:"name"`
	}
	if err := mon.Run(ctx, "qom-list", map[string]any{"path": "/objects"}, &objs); err != nil {
		return fmt.Errorf("list the output holds: %w", err)
	}
	type hold struct {
		id  string
		tag uint64
	}
	var holds []hold
	for _, o := range objs {
		rest, ok := strings.CutPrefix(o.Name, holdPrefix)
		if !ok {
			continue
		}
		t, _, _ := strings.Cut(rest, "-")
		tag, err := strconv.ParseUint(t, 10, 64)
		if err != nil || (below != 0 && tag >= below) {
			continue
		}
		holds = append(holds, hold{o.Name, tag})
	}
	for i := 1; i < len(holds); i++ { // few: insertion sort by tag
		for j := i; j > 0 && holds[j].tag < holds[j-1].tag; j-- {
			holds[j], holds[j-1] = holds[j-1], holds[j]
		}
	}
	for _, h := range holds {
		if err := mon.Run(ctx, "object-del", map[string]any{"id": h.id}, nil); err != nil {
			return fmt.Errorf("release the guest's output held in %s: %w", h.id, err)
		}
	}
	return nil
}
