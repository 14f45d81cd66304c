package guestimage

import (
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// locateModules returns the paths of guestModules in a kernel's modules
// directory, failing with the name of the first one missing.
func locateModules(modulesDir string) (map[string]string, error) {
	modules := make(map[string]string)
	base := filepath.Join(modulesDir, "kernel")
	for _, m := range guestModules() {
		p := filepath.Join(base, filepath.FromSlash(m)+".ko")
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("lacks required module %s.ko (compressed or renamed?): %w", m, err)
		}
		modules[m] = p
	}
	return modules, nil
}

// checkStatic fails unless path is an ELF executable without a program
// interpreter: the initramfs has no dynamic loader or C library.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("open %s as ELF: %w", path, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("%s is built for %s, want x86-64", path, f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked", path)
		}
	}
	return nil
}

// checkBusybox verifies that path is a usable static busybox.
func checkBusybox(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%s not found: install busybox-static (apt-get install busybox-static)", path)
	}
	if err := checkStatic(path); err != nil {
		return fmt.Errorf("busybox is not usable in the guest, install busybox-static (apt-get install busybox-static): %w", err)
	}
	return nil
}
