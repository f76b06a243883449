// Command comfyfarm turns many ComfyUI servers into one image-generation
// service: `comfyfarm serve` runs it; the other subcommands migrate its
// databases, talk to a running server, or run a fake ComfyUI node.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
)

// env is what a command may touch of the outside world; tests give their own.
type env struct {
	stdout, stderr io.Writer
	environ        []string
	// ready, when set, is told the address serve listens on.
	ready func(net.Addr)
}

func (e *env) getenv(name string) string {
	for _, kv := range slices.Backward(e.environ) {
		if k, v, ok := strings.Cut(kv, "="); ok && k == name {
			return v
		}
	}
	return ""
}

// command is one subcommand.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, e *env, args []string) error
}

var commands []command

// register adds a subcommand; files call it from init.
func register(c command) {
	commands = append(commands, c)
	slices.SortFunc(commands, func(a, b command) int { return strings.Compare(a.name, b.name) })
}

// errUsage marks a command-line mistake: exit status 2, no extra noise.
var errUsage = errors.New("usage")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	e := &env{stdout: os.Stdout, stderr: os.Stderr, environ: os.Environ()}
	err := run(ctx, e, os.Args[1:])
	stop()
	os.Exit(exitCode(e.stderr, err))
}

// exitCode is the process's exit status for run's result, Go's convention:
// 0 for success and for asked-for help (-h), 2 for a command-line mistake
// (the usage is already printed), 1 for anything else, printed as one line.
func exitCode(stderr io.Writer, err error) int {
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	default:
		fmt.Fprintln(stderr, "comfyfarm:", err)
		return 1
	}
}

func run(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(e.stderr)
		if len(args) == 0 {
			return errUsage
		}
		return nil
	}
	for _, c := range commands {
		if c.name == args[0] {
			return c.run(ctx, e, args[1:])
		}
	}
	fmt.Fprintf(e.stderr, "comfyfarm: unknown command %q\n\n", args[0])
	usage(e.stderr)
	return errUsage
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: comfyfarm <command> [flags]")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "commands:")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-9s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Run 'comfyfarm <command> -h' for a command's flags.")
}

// newFlagSet makes a flag set that reports errors instead of exiting.
func newFlagSet(e *env, name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	fs.Usage = func() {
		fmt.Fprintf(e.stderr, "usage: comfyfarm %s %s\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args, refusing stray positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected argument %q\n", fs.Arg(0))
		fs.Usage()
		return errUsage
	}
	return nil
}

// newLogger builds the slog logger the config asks for, writing to w.
func newLogger(w io.Writer, cfg LogConfig) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.Level)) // validated by Config.Validate
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// loadConfig loads the configuration for a command and logs any warning.
func loadConfig(e *env, path string) (*Config, *slog.Logger, error) {
	cfg, warnings, err := LoadConfig(path, e.environ)
	if err != nil {
		return nil, nil, err
	}
	log := newLogger(e.stderr, cfg.Log)
	for _, w := range warnings {
		log.Warn(w)
	}
	return cfg, log, nil
}
