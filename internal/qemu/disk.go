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

// CreateOverlay makes a qcow2 at path whose backing file is backing (a
// path relative to path's directory, of format fmt), of size bytes (0: the
// backing file's size). Writes go to the overlay; the backing file is only
// read, and shared by every VM made from it.
func CreateOverlay(ctx context.Context, path, backing, format string, size int64) error {
	args := []string{"create", "-q", "-f", "qcow2", "-b", backing, "-F", format, path}
	if size > 0 {
		args = append(args, strconv.FormatInt(size, 10))
	}
	cmd := exec.CommandContext(ctx, "qemu-img", args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("create disk %s on %s: %s: %w", path, backing, strings.TrimSpace(out.String()), err)
	}
	return nil
}
