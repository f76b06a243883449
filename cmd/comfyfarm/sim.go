package main

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
)

func init() {
	register(command{name: "sim", summary: "run a fake ComfyUI node (for trying comfyfarm without a GPU)", run: cmdSim})
}

func cmdSim(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "sim", "[--port N] [--host ADDR] [--generation current|classic|legacy]")
	port := fs.Int("port", 8188, "port to listen on")
	host := fs.String("host", "127.0.0.1", "address to listen on")
	generation := fs.String("generation", "current", "ComfyUI protocol generation: current (v0.8), classic (v0.3.10) or legacy (2023)")
	classTime := fs.Duration("class-time", 200*time.Millisecond, "how long each workflow node takes")
	previews := fs.Bool("previews", false, "send preview images while sampling")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *port < 1 || *port > 65535 {
		return fmt.Errorf("--port %d: want 1 to 65535", *port)
	}
	gen, ok := map[string]comfytest.Generation{
		"current": comfytest.GenCurrent, "classic": comfytest.GenClassic, "legacy": comfytest.GenLegacy,
	}[*generation]
	if !ok {
		return fmt.Errorf("--generation %q: want current, classic or legacy", *generation)
	}
	log := newLogger(e.stderr, LogConfig{Level: *logLevel, Format: "text"})
	return comfytest.ListenAndServe(ctx, net.JoinHostPort(*host, strconv.Itoa(*port)), comfytest.Options{
		Generation:       gen,
		DefaultClassTime: *classTime,
		Previews:         *previews,
		Logger:           log,
	})
}
