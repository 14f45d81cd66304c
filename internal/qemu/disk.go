package qemu

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
)

// CreateDisk makes an empty qcow2 image of size bytes.
func CreateDisk(ctx context.Context, path string, size int64) error {
	bin, err := exec.LookPath("qemu-img")
	if err != nil {
		return fmt.Errorf("qemu-img is not installed: install it with 'apt-get install qemu-utils'")
	}
	cmd := exec.CommandContext(ctx, bin, "create", "-q", "-f", "qcow2", path, strconv.FormatInt(size, 10))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("create disk %s: %s: %w", path, strings.TrimSpace(out.String()), err)
	}
	return nil
}
