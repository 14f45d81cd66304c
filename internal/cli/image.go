package cli

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/internal/agent"
)

func newImageCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "image", Short: "Import, list and delete OS images; build the built-in guest"}
	cmd.AddCommand(newImageImportCmd(g), newImageListCmd(g), newImageDeleteCmd(g), newImageBuildCmd(g))
	return cmd
}

func newImageImportCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "import NAME FILE",
		Short: "Import a disk image (qcow2 or raw) or an installer ISO under NAME",
		Long: `Import a disk image (qcow2 or raw) or an installer ISO under NAME.

The file is checked with qemu-img (no backing file, no external data file,
not truncated) and stored by its sha256 digest; VMs made from it get a
copy-on-write overlay. Use 'vigil vm create NAME --image IMAGE' for a disk
image and '--iso IMAGE' for an installer.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := os.Open(args[1])
			if err != nil {
				return fmt.Errorf("open the image file: %w", err)
			}
			defer f.Close()
			st, err := f.Stat()
			if err != nil {
				return fmt.Errorf("open the image file: %w", err)
			}
			if !st.Mode().IsRegular() {
				return fmt.Errorf("%s is not a regular file: give an image file (qcow2, raw or iso)", args[1])
			}
			var r io.Reader = f
			if !g.quiet && g.output == "table" {
				r = &uploadProgress{r: f, total: st.Size(), w: g.errOut, name: filepath.Base(args[1])}
			}
			img, err := g.client().ImportImage(cmd.Context(), args[0], r, st.Size())
			if p, ok := r.(*uploadProgress); ok {
				p.done()
			}
			if err != nil {
				return err
			}
			return g.printImage(img)
		},
	}
}

func newImageListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List imported images",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			imgs, err := g.client().Images(cmd.Context())
			if err != nil {
				return err
			}
			if g.quiet {
				for _, im := range imgs {
					fmt.Fprintln(g.out, im.Name)
				}
				return nil
			}
			return g.printValue(imgs, func(w io.Writer) {
				row(w, "NAME", "FORMAT", "VIRTUAL SIZE", "FILE SIZE", "SHA256", "VMS")
				for _, im := range imgs {
					row(w, im.Name, im.Format, humanSize(im.VirtualSize), humanSize(im.FileSize),
						strings.TrimPrefix(im.Digest, "sha256:"), orNone(strings.Join(im.VMs, ",")))
				}
			})
		},
	}
}

func newImageDeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete an image no VM uses",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.client().DeleteImage(cmd.Context(), args[0])
		},
	}
}

func (g *globals) printImage(im api.Image) error {
	if g.quiet {
		fmt.Fprintln(g.out, im.Name)
		return nil
	}
	return g.printValue(im, func(w io.Writer) {
		row(w, "NAME:", im.Name)
		row(w, "FORMAT:", im.Format)
		row(w, "VIRTUAL SIZE:", humanSize(im.VirtualSize))
		row(w, "FILE SIZE:", humanSize(im.FileSize))
		row(w, "DIGEST:", im.Digest)
		row(w, "VMS:", orNone(strings.Join(im.VMs, ",")))
	})
}

func orNone(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// uploadProgress prints how much of an upload has gone, every 5%.
type uploadProgress struct {
	r     io.Reader
	w     io.Writer
	name  string
	total int64
	sent  int64
	shown int64
}

func (p *uploadProgress) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.sent += int64(n)
	if p.total > 0 && (p.sent-p.shown)*20 >= p.total {
		p.shown = p.sent
		fmt.Fprintf(p.w, "\ruploading %s: %d%% of %s", p.name, p.sent*100/p.total, humanSize(p.total))
	}
	return n, err
}

func (p *uploadProgress) done() {
	if p.shown > 0 {
		fmt.Fprintln(p.w)
	}
}

func newImageBuildCmd(g *globals) *cobra.Command {
	var dataDir, dir, guestAgent string
	build := &cobra.Command{
		Use:   "build",
		Short: "Build the default guest image (Debian cloud kernel, busybox, vigil-guest); reused when up to date",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if dir == "" {
				dir = filepath.Join(dataDir, "images", "default")
			}
			img, err := agent.BuildImage(cmd.Context(), dir, guestAgent, func(s string) {
				if !g.quiet {
					fmt.Fprint(g.errOut, s)
				}
			})
			if err != nil {
				return err
			}
			if g.quiet {
				return nil
			}
			return g.printValue(img, func(w io.Writer) {
				row(w, "KERNEL:", img.Kernel)
				row(w, "INITRD:", img.Initrd)
				row(w, "KERNEL VERSION:", img.KernelVersion)
			})
		},
	}
	build.Flags().StringVar(&dataDir, "data-dir", envOr("VIGIL_DATA_DIR", agent.DefaultDataDir()), "data dir whose images/default to build")
	build.Flags().StringVar(&dir, "out", "", "build into this directory instead")
	build.Flags().StringVar(&guestAgent, "guest-agent", "", "vigil-guest binary (default: next to vigil)")
	return build
}
