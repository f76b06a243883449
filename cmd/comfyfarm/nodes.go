package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/comfyfarm/comfyfarm/schema"
)

func init() {
	register(command{name: "nodes", summary: "list the nodes of a running server", run: cmdNodes})
}

// defaultServer is where the client commands look for the server.
func defaultServer(e *env) string {
	if v := e.getenv("COMFYFARM_SERVER"); v != "" {
		return v
	}
	return "http://127.0.0.1:8080"
}

func cmdNodes(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "nodes", "[--server URL] [--key KEY] [--json]")
	server := fs.String("server", defaultServer(e), "comfyfarm server (env COMFYFARM_SERVER)")
	key := fs.String("key", "", "admin key (default: env COMFYFARM_ADMIN_KEY)")
	asJSON := fs.Bool("json", false, "print the node views as JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *key == "" {
		*key = e.getenv("COMFYFARM_ADMIN_KEY")
	}
	if *key == "" {
		return fmt.Errorf("no admin key: pass --key or set COMFYFARM_ADMIN_KEY")
	}
	c, err := newAPIClient(*server, *key)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	req, err := c.request(ctx, "GET", "/api/v1/nodes", nil, "")
	if err != nil {
		return err
	}
	var nodes []schema.NodeView
	if err := c.do(ctx, req, &nodes); err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(nodes)
	}
	return printNodes(e.stdout, nodes)
}

// printNodes writes the nodes as a table.
func printNodes(w io.Writer, nodes []schema.NodeView) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tURL\tVRAM FREE/TOTAL\tQUEUE RUN/PEND\tINFLIGHT\tCURRENT JOB\tLATENCY\tDONE\tFAILED\tERROR")
	for _, n := range nodes {
		latency := "-"
		if n.LatencyMS > 0 {
			latency = fmt.Sprintf("%.0fms", n.LatencyMS)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d/%d\t%d/%d\t%s\t%s\t%d\t%d\t%s\n",
			n.Name, n.State, n.URL, vram(n.Devices), n.QueueRunning, n.QueuePending,
			n.Inflight, n.MaxInflight, dash(n.CurrentJob), latency, n.JobsDone, n.JobsFailed, dash(oneLine(n.Error, 60)))
	}
	if len(nodes) == 0 {
		fmt.Fprintln(tw, "(no nodes)")
	}
	return tw.Flush()
}

func vram(devs []schema.Device) string {
	if len(devs) == 0 {
		return "-"
	}
	var free, total int64
	for _, d := range devs {
		free += d.VRAMFree
		total += d.VRAMTotal
	}
	return fmt.Sprintf("%.1f/%.1f GiB", float64(free)/(1<<30), float64(total)/(1<<30))
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// oneLine keeps a message on one table line, at most n runes.
func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return s
}
