package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

func init() {
	register(command{name: "health", summary: "exit 0 when a running server is ready (/readyz answers 200), else 1", run: cmdHealth})
}

// healthTimeout bounds the readiness check: a container's HEALTHCHECK must
// not hang on a server that accepts connections but never answers.
const healthTimeout = 5 * time.Second

func cmdHealth(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "health", "[--url URL] [--timeout D]")
	base := fs.String("url", defaultServer(e), "the server's base address (env COMFYFARM_SERVER)")
	timeout := fs.Duration("timeout", healthTimeout, "give up after this long")
	quiet := fs.Bool("quiet", false, "print nothing when ready")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	u := strings.TrimRight(*base, "/")
	if !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
		return fmt.Errorf("--url %q: want http://host:port", *base)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u+"/readyz", nil)
	if err != nil {
		return err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("not ready: %w", err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("not ready: /readyz answered %d: %s", res.StatusCode, strings.TrimSpace(string(body)))
	}
	if !*quiet {
		fmt.Fprintf(e.stdout, "ready: %s\n", strings.TrimSpace(string(body)))
	}
	return nil
}
