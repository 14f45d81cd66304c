package hostagent

import (
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"
)

func TestStatCPUTicks(t *testing.T) {
	tests := []struct {
		line string
		want int64
	}{
		{"1234 (qemu-system-x86) S 1 2 3 4 5 6 7 8 9 10 150 25 0 0 20 0 1 0", 175},
		{"99 (CPU 0/TCG) R 1 2 3 4 5 6 7 8 9 10 3 4 0 0", 7},
		{"99 (weird) name)) R 1 2 3 4 5 6 7 8 9 10 1 1 0 0", 2},
		{"garbage", 0},
		{"1 (x) S 1 2", 0},
		{"7 (x) S 1 2 3 4 5 6 7 8 9 10 12 30\n", 42},
	}
	for _, tt := range tests {
		if got := statCPUTicks([]byte(tt.line)); got != tt.want {
			t.Fatalf("statCPUTicks(%q) = %d, want %d", tt.line, got, tt.want)
		}
	}
}

// TestThreadClock reads the test's own thread: its CPU time grows as it
// works, reread in place.
func TestThreadClock(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	c := openThreadClock(os.Getpid(), []int{syscall.Gettid()})
	defer c.close()
	if len(c.files) != 1 {
		t.Fatal("cannot open this process's stat file")
	}
	before := c.cpu()
	// Work until the reread shows it (the machine may be busy: bounded).
	for deadline := time.Now().Add(10 * time.Second); c.cpu()-before < 50*time.Millisecond; {
		if time.Now().After(deadline) {
			t.Fatalf("after 10 s of work the thread's cpu still reads %s (from %s)", c.cpu(), before)
		}
		for end := time.Now().Add(20 * time.Millisecond); time.Now().Before(end); {
		}
	}
}
