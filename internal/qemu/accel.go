package qemu

import (
	"bytes"
	"fmt"
	"os"
)

// Accelerator modes accepted by --accel.
const (
	AccelAuto = "auto"
	AccelKVM  = "kvm"
	AccelTCG  = "tcg"
)

// ChooseAccel resolves --accel. "auto" picks KVM only when /dev/kvm opens and
// the CPU advertises hardware virtualisation: on a nested guest /dev/kvm
// exists without vmx/svm and a KVM guest hangs, so TCG is the safe choice.
func ChooseAccel(mode string) (string, error) {
	return chooseAccel(mode, "/dev/kvm", "/proc/cpuinfo")
}

func chooseAccel(mode, kvmDev, cpuinfo string) (string, error) {
	switch mode {
	case AccelKVM, AccelTCG:
		return mode, nil
	case AccelAuto, "":
	default:
		return "", fmt.Errorf("unknown accelerator %q: use auto, kvm or tcg", mode)
	}
	f, err := os.OpenFile(kvmDev, os.O_RDWR, 0)
	if err != nil {
		return AccelTCG, nil
	}
	f.Close()
	info, err := os.ReadFile(cpuinfo)
	if err != nil {
		return AccelTCG, nil
	}
	for _, line := range bytes.Split(info, []byte("\n")) {
		if !bytes.HasPrefix(line, []byte("flags")) {
			continue
		}
		for _, flag := range bytes.Fields(line) {
			if string(flag) == "vmx" || string(flag) == "svm" {
				return AccelKVM, nil
			}
		}
		break
	}
	return AccelTCG, nil
}
