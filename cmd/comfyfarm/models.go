package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
)

func init() {
	register(command{name: "models", summary: "list the model files and other enum values of the nodes, and which nodes have them", run: cmdModels})
}

const modelsSynopsis = `[--input NAME] [--json] [--server URL] [--key KEY]
       (the key defaults to COMFYFARM_ADMIN_KEY)`

func cmdModels(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "models", modelsSynopsis)
	server := fs.String("server", defaultServer(e), "comfyfarm server (env COMFYFARM_SERVER)")
	key := fs.String("key", "", "admin key (default: env COMFYFARM_ADMIN_KEY)")
	asJSON := fs.Bool("json", false, "print GET /api/v1/models as JSON")
	input := fs.String("input", "", "only this input (ckpt_name, lora_name, image...); default: the model inputs")
	if _, err := parseInterleaved(fs, args); err != nil {
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
	var m map[string]map[string][]string
	if err := c.call(ctx, "GET", "/api/v1/models", nil, &m); err != nil {
		return err
	}
	if *asJSON {
		return printJSON(e.stdout, m)
	}
	return printModels(e.stdout, m, *input)
}

// printModels prints one line per input and value: the nodes that have it.
// Without a filter only inputs that name files are shown (samplers and the
// like are the same on every node and would bury them).
func printModels(w io.Writer, m map[string]map[string][]string, input string) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "INPUT\tVALUE\tNODES")
	rows := 0
	for _, in := range slices.Sorted(maps.Keys(m)) {
		if input != "" && in != input {
			continue
		}
		if input == "" && !fileInput(in) {
			continue
		}
		for _, v := range slices.Sorted(maps.Keys(m[in])) {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", in, v, strings.Join(m[in][v], ","))
			rows++
		}
	}
	if rows == 0 {
		fmt.Fprintln(tw, "(none)")
	}
	return tw.Flush()
}

// fileInput reports whether an enum input names files (models, input
// images) rather than algorithms.
func fileInput(in string) bool {
	switch in {
	case "image", "upscale_model", "ipadapter_file", "instantid_file", "pulid_file":
		return true
	case "sampler_name", "scheduler_name":
		return false
	}
	return strings.HasSuffix(in, "_name")
}
