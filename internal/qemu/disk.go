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

// DiskSnapshot runs `qemu-img snapshot` on an image no QEMU has open:
// op is "create", "apply" or "delete".
func DiskSnapshot(ctx context.Context, path, op, name string) error {
	flag := map[string]string{"create": "-c", "apply": "-a", "delete": "-d"}[op]
	if flag == "" {
		return fmt.Errorf("unknown disk snapshot operation %q", op)
	}
	cmd := exec.CommandContext(ctx, "qemu-img", "snapshot", flag, name, path)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s disk snapshot %s of %s: %s: %w", op, name, path, strings.TrimSpace(out.String()), err)
	}
	return nil
}
