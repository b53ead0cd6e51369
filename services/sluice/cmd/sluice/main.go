// Command sluice runs the whole platform in one process (sluice up) and holds the
// tools around it. Run `sluice help`.
package main

import (
	"os"

	"github.com/sluicehq/sluice/services/sluice/cli"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], cli.IO{Env: os.LookupEnv, Stdout: os.Stdout, Stderr: os.Stderr}))
}
