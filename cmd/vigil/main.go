// Command vigil is Vigil's CLI and its agent (`vigil agent --dev`).
package main

import (
	"context"
	"os"

	"github.com/vigil-project/vigil/internal/cli"
)

func main() {
	os.Exit(cli.Main(context.Background(), os.Args[1:]))
}
