package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"strings"
	"text/tabwriter"

	"github.com/comfyfarm/comfyfarm/schema"
)

func init() {
	register(command{name: "nodes", summary: "list, add, remove, drain and probe the nodes of a running server", run: cmdNodes})
}

// defaultServer is where the client commands look for the server.
func defaultServer(e *env) string {
	if v := e.getenv("COMFYFARM_SERVER"); v != "" {
		return v
	}
	return "http://127.0.0.1:8080"
}

const nodesSynopsis = `[ls] [--json] | add NAME URL [--tags a,b] [--max-inflight N] | set NAME [--tags a,b] [--max-inflight N]
       | rm NAME | drain NAME | undrain NAME | probe NAME
       (every form takes [--server URL] [--key KEY]; the key defaults to COMFYFARM_ADMIN_KEY)`

// nodeVerbs are the actions of `comfyfarm nodes`, with their positional
// arguments.
var nodeVerbs = map[string][]string{
	"ls": nil, "add": {"NAME", "URL"}, "set": {"NAME"}, "rm": {"NAME"}, "drain": {"NAME"}, "undrain": {"NAME"}, "probe": {"NAME"},
}

func cmdNodes(ctx context.Context, e *env, args []string) error {
	verb, args := splitVerb(args, nodeVerbs)
	fs := newFlagSet(e, "nodes", nodesSynopsis)
	server := fs.String("server", defaultServer(e), "comfyfarm server (env COMFYFARM_SERVER)")
	key := fs.String("key", "", "admin key (default: env COMFYFARM_ADMIN_KEY)")
	asJSON := fs.Bool("json", false, "print node views as JSON")
	tags := fs.String("tags", "", "add, set: comma-separated tags (set: \"\" clears them)")
	maxInflight := fs.Int("max-inflight", 1, "add, set: jobs the node runs at once")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if err := checkVerbArgs(e, fs, verb, pos, nodeVerbs); err != nil {
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

	if verb == "ls" {
		var nodes []schema.NodeView
		if err := c.call(ctx, "GET", "/api/v1/nodes", nil, &nodes); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(e.stdout, nodes)
		}
		return printNodes(e.stdout, nodes)
	}
	name := pos[0]
	path := "/api/v1/nodes/" + url.PathEscape(name)
	var view schema.NodeView
	switch verb {
	case "add":
		body := map[string]any{"name": name, "url": pos[1], "tags": splitList(*tags), "max_inflight": *maxInflight}
		err = c.call(ctx, "POST", "/api/v1/nodes", body, &view)
	case "set":
		body := map[string]any{}
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "tags":
				body["tags"] = splitList(*tags)
			case "max-inflight":
				body["max_inflight"] = *maxInflight
			}
		})
		if len(body) == 0 {
			fmt.Fprintln(e.stderr, "comfyfarm nodes set: give --tags and/or --max-inflight")
			return errUsage
		}
		err = c.call(ctx, "PATCH", path, body, &view)
	case "rm":
		if err := c.call(ctx, "DELETE", path, nil, nil); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "removed node %s\n", name)
		return nil
	case "drain", "undrain":
		err = c.call(ctx, "POST", path+"/drain", map[string]bool{"drain": verb == "drain"}, &view)
	case "probe":
		err = c.call(ctx, "POST", path+"/probe", nil, &view)
	}
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(e.stdout, view)
	}
	return printNodes(e.stdout, []schema.NodeView{view})
}

// parseInterleaved parses flags that may come before, between or after the
// positional arguments (`nodes add gpu-2 URL --tags sdxl`), and returns the
// positional ones.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, errUsage
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos, args = append(pos, args[0]), args[1:]
	}
}

// splitList splits a comma-separated list, dropping empty items.
func splitList(s string) []string {
	out := []string{}
	for _, item := range strings.Split(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
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
