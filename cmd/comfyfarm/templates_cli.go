package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/comfyfarm/comfyfarm/schema"
)

func init() {
	register(command{name: "templates", summary: "list, show, store and delete the workflow templates of a running server", run: cmdTemplates})
}

const templatesSynopsis = `[ls] | show NAME[@VERSION] | put NAME FILE | rm NAME
       (every form takes [--server URL] [--key KEY] [--frontend F] [--json]; the key defaults to
       COMFYFARM_API_KEY, then COMFYFARM_ADMIN_KEY, which needs --frontend; put and rm need the admin key)`

var templateVerbs = map[string][]string{"ls": nil, "show": {"NAME"}, "put": {"NAME", "FILE"}, "rm": {"NAME"}}

func cmdTemplates(ctx context.Context, e *env, args []string) error {
	verb, args := splitVerb(args, templateVerbs)
	fs := newFlagSet(e, "templates", templatesSynopsis)
	server := fs.String("server", defaultServer(e), "comfyfarm server (env COMFYFARM_SERVER)")
	key := fs.String("key", "", "API key (default: env COMFYFARM_API_KEY, then COMFYFARM_ADMIN_KEY)")
	frontend := fs.String("frontend", "", "frontend (required with the admin key)")
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if err := checkVerbArgs(e, fs, verb, pos, templateVerbs); err != nil {
		return err
	}
	k, err := apiKey(e, *key)
	if err != nil {
		return err
	}
	c, err := newAPIClient(*server, k)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()

	if verb == "ls" {
		var list []schema.Template
		if err := c.call(ctx, "GET", templatePath("", *frontend, 0), nil, &list); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(e.stdout, list)
		}
		return printTemplates(e.stdout, list)
	}
	switch verb {
	case "show":
		t, err := fetchTemplate(ctx, c, pos[0], *frontend)
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(e.stdout, t)
		}
		return printTemplate(e.stdout, t)
	case "put":
		data, err := os.ReadFile(pos[1])
		if err != nil {
			return err
		}
		req, err := c.request(ctx, "PUT", templatePath(pos[0], *frontend, 0), bytes.NewReader(data), "application/json")
		if err != nil {
			return err
		}
		var t schema.Template
		if err := c.do(ctx, req, &t); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(e.stdout, t)
		}
		fmt.Fprintf(e.stdout, "stored template %s of %s\n", t.Ref(), t.Frontend)
		return nil
	default: // rm
		if err := c.call(ctx, "DELETE", templatePath(pos[0], *frontend, 0), nil, nil); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "deleted template %s\n", pos[0])
		return nil
	}
}

// templatePath is the API path of one template (name "": the list).
func templatePath(name, frontend string, version int) string {
	p := "/api/v1/templates"
	if name != "" {
		p += "/" + url.PathEscape(name)
	}
	q := url.Values{}
	if frontend != "" {
		q.Set("frontend", frontend)
	}
	if version > 0 {
		q.Set("version", fmt.Sprint(version))
	}
	if len(q) > 0 {
		p += "?" + q.Encode()
	}
	return p
}

// fetchTemplate reads "name" or "name@version".
func fetchTemplate(ctx context.Context, c *apiClient, ref, frontend string) (*schema.Template, error) {
	name, version, err := schema.ParseTemplateRef(ref)
	if err != nil {
		return nil, err
	}
	var t schema.Template
	if err := c.call(ctx, "GET", templatePath(name, frontend, version), nil, &t); err != nil {
		return nil, err
	}
	return &t, nil
}

func printTemplates(w io.Writer, list []schema.Template) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tVERSION\tINPUTS\tCREATED")
	for _, t := range list {
		names := make([]string, len(t.Inputs))
		for i, in := range t.Inputs {
			names[i] = in.Name
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", t.Name, t.Version, dash(oneLine(strings.Join(names, ","), 60)), t.CreatedAt.Format("2006-01-02 15:04:05"))
	}
	return tw.Flush()
}

func printTemplate(w io.Writer, t *schema.Template) error {
	fmt.Fprintf(w, "template %s of %s, created %s\n", t.Ref(), t.Frontend, t.CreatedAt.Format("2006-01-02 15:04:05"))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "INPUT\tTYPE\tSETS\tDEFAULT\tRANGE / CHOICES\tREQUIRED")
	for _, in := range t.Inputs {
		var rng string
		switch {
		case len(in.Choices) > 0:
			rng = strings.Join(in.Choices, "|")
		case in.Min != nil || in.Max != nil:
			rng = bound(in.Min) + ".." + bound(in.Max)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s.%s\t%s\t%s\t%v\n", in.Name, in.Type, in.Node, in.Input, dash(string(in.Default)), dash(oneLine(rng, 60)), in.Required)
	}
	return tw.Flush()
}

func bound(f *float64) string {
	if f == nil {
		return ""
	}
	return fmt.Sprint(*f)
}

// templateInputs turns --input name=value flags into the JSON of a submit's
// inputs, by the template's declared types: numbers and booleans as JSON,
// the rest as strings. An image input's value "@FILE" uploads FILE and names
// it; the files to upload are returned.
func templateInputs(t *schema.Template, flags []string) (json.RawMessage, []string, error) {
	types := map[string]schema.TemplateInputType{}
	for _, in := range t.Inputs {
		types[in.Name] = in.Type
	}
	values := map[string]json.RawMessage{}
	var uploads []string
	for _, f := range flags {
		name, v, ok := strings.Cut(f, "=")
		if !ok {
			return nil, nil, fmt.Errorf("--input %q: want NAME=VALUE", f)
		}
		typ, known := types[name]
		if !known {
			return nil, nil, fmt.Errorf("--input %s: template %s has no such input", name, t.Ref())
		}
		switch typ {
		case schema.InputInt, schema.InputFloat, schema.InputBool:
			if !json.Valid([]byte(v)) {
				return nil, nil, fmt.Errorf("--input %s: %q is not a %s", name, v, typ)
			}
			values[name] = json.RawMessage(v)
			continue
		case schema.InputImage:
			if file, ok := strings.CutPrefix(v, "@"); ok {
				uploads = append(uploads, file)
				v = filepath.Base(file)
			}
		}
		b, _ := json.Marshal(v)
		values[name] = b
	}
	b, err := json.Marshal(values)
	return b, uploads, err
}
