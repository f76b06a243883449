package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"mime/multipart"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

func init() {
	register(command{name: "submit", summary: "submit a workflow or a template to a running server (--wait follows it)", run: cmdSubmit})
}

// stringList is a repeatable flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

var _ flag.Value = (*stringList)(nil)

type submitOptions struct {
	server, key, frontend, user, workflow, metadata, idempotencyKey string
	template                                                        string
	priority                                                        int
	images, inputs                                                  stringList
	wait                                                            bool
	timeout                                                         time.Duration
}

func cmdSubmit(ctx context.Context, e *env, args []string) error {
	var o submitOptions
	fs := newFlagSet(e, "submit", "--frontend F (--workflow FILE | --template NAME [--input NAME=VALUE]...) [--user U] [--image FILE]... [--wait]")
	fs.StringVar(&o.server, "server", defaultServer(e), "comfyfarm server (env COMFYFARM_SERVER)")
	fs.StringVar(&o.key, "key", "", "API key (default: env COMFYFARM_API_KEY, then COMFYFARM_ADMIN_KEY)")
	fs.StringVar(&o.frontend, "frontend", "", "frontend to submit for (required with the admin key)")
	fs.StringVar(&o.user, "user", "cli", "the frontend's user id")
	fs.StringVar(&o.workflow, "workflow", "", "API-format workflow JSON file (\"-\": stdin)")
	fs.StringVar(&o.metadata, "metadata", "", "metadata JSON object kept with the job and its photos")
	fs.StringVar(&o.idempotencyKey, "idempotency-key", "", "Idempotency-Key: resubmitting with the same key returns the same job")
	fs.IntVar(&o.priority, "priority", 0, "priority, -100..100 (higher runs sooner)")
	fs.Var(&o.images, "image", "input image to upload (repeatable); a LoadImage input names it by its file name")
	fs.StringVar(&o.template, "template", "", "run this template (NAME or NAME@VERSION) instead of a workflow")
	fs.Var(&o.inputs, "input", "a template input, NAME=VALUE (repeatable); an image input's @FILE uploads FILE")
	fs.BoolVar(&o.wait, "wait", false, "follow the job's progress and print its output URLs")
	fs.DurationVar(&o.timeout, "timeout", 0, "give up waiting after this long (0: no limit)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if (o.workflow == "") == (o.template == "") {
		fmt.Fprintln(e.stderr, "submit: give --workflow or --template")
		fs.Usage()
		return errUsage
	}
	if len(o.inputs) > 0 && o.template == "" {
		fmt.Fprintln(e.stderr, "submit: --input goes with --template")
		return errUsage
	}
	key, err := apiKey(e, o.key)
	if err != nil {
		return err
	}
	o.key = key
	c, err := newAPIClient(o.server, o.key)
	if err != nil {
		return err
	}
	if o.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.timeout)
		defer cancel()
	}
	var graph, inputs json.RawMessage
	if o.template != "" {
		rctx, cancel := context.WithTimeout(ctx, requestTimeout)
		t, err := fetchTemplate(rctx, c, o.template, o.frontend)
		cancel()
		if err != nil {
			return err
		}
		var uploads []string
		if inputs, uploads, err = templateInputs(t, o.inputs); err != nil {
			return err
		}
		o.images = append(o.images, uploads...)
		graph = t.Workflow
	} else if graph, err = readWorkflow(o.workflow); err != nil {
		return err
	}
	sub, err := submitJob(ctx, c, o, graph, inputs)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "job %s %s (position %d)\n", sub.ID, sub.State, sub.Position)
	if !o.wait {
		return nil
	}
	job, err := followJob(ctx, c, sub.EventsURL, e.stderr, workflowNodes(graph))
	if err != nil {
		return err
	}
	switch job.State {
	case schema.JobSucceeded:
		for _, out := range job.Outputs {
			fmt.Fprintln(e.stdout, out.URL)
		}
		return nil
	case schema.JobFailed:
		if job.Error != nil {
			return fmt.Errorf("job %s failed: %s", job.ID, job.Error.Error())
		}
		return fmt.Errorf("job %s failed", job.ID)
	default:
		return fmt.Errorf("job %s %s", job.ID, job.State)
	}
}

// readWorkflow reads an API-format graph; a {"prompt": {...}} wrapper (the
// body ComfyUI's /prompt takes) is unwrapped.
func readWorkflow(path string) (json.RawMessage, error) {
	var data []byte
	var err error
	if path == "-" {
		data, err = io.ReadAll(io.LimitReader(os.Stdin, 32<<20))
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, fmt.Errorf("workflow: %w", err)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(data, &obj); err != nil {
		return nil, fmt.Errorf("workflow %s: not a JSON object: %w", path, err)
	}
	if p, ok := obj["prompt"]; ok && len(obj) <= 3 && bytes.HasPrefix(bytes.TrimSpace(p), []byte("{")) {
		return p, nil
	}
	return data, nil
}

type submitAnswer struct {
	ID        string          `json:"id"`
	State     schema.JobState `json:"state"`
	Position  int             `json:"position"`
	EventsURL string          `json:"events_url"`
}

// submitJob posts a job: the workflow graph, or with o.template the
// template and its inputs.
func submitJob(ctx context.Context, c *apiClient, o submitOptions, graph, inputs json.RawMessage) (*submitAnswer, error) {
	var metadata json.RawMessage
	if o.metadata != "" {
		metadata = json.RawMessage(o.metadata)
		if !json.Valid(metadata) {
			return nil, errors.New("--metadata is not valid JSON")
		}
	}
	var body bytes.Buffer
	contentType := "application/json"
	if len(o.images) == 0 {
		fields := map[string]any{"frontend": o.frontend, "user_id": o.user, "priority": o.priority, "metadata": metadata}
		if o.template != "" {
			fields["template"], fields["inputs"] = o.template, inputs
		} else {
			fields["workflow"] = graph
		}
		if err := json.NewEncoder(&body).Encode(fields); err != nil {
			return nil, err
		}
	} else {
		w := multipart.NewWriter(&body)
		fields := map[string]string{"user_id": o.user, "priority": fmt.Sprint(o.priority)}
		if o.template != "" {
			fields["template"] = o.template
			if inputs != nil {
				fields["inputs"] = string(inputs)
			}
		} else {
			fields["workflow"] = string(graph)
		}
		if o.frontend != "" {
			fields["frontend"] = o.frontend
		}
		if metadata != nil {
			fields["metadata"] = string(metadata)
		}
		for k, v := range fields {
			if err := w.WriteField(k, v); err != nil {
				return nil, err
			}
		}
		for _, path := range o.images {
			data, err := os.ReadFile(path)
			if err != nil {
				return nil, fmt.Errorf("image: %w", err)
			}
			fw, err := w.CreateFormFile("images", filepath.Base(path))
			if err != nil {
				return nil, err
			}
			if _, err := fw.Write(data); err != nil {
				return nil, err
			}
		}
		if err := w.Close(); err != nil {
			return nil, err
		}
		contentType = w.FormDataContentType()
	}
	path := "/api/v1/jobs"
	if o.frontend != "" && len(o.images) == 0 {
		path += "?frontend=" + o.frontend
	}
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	req, err := c.request(rctx, "POST", path, &body, contentType)
	if err != nil {
		return nil, err
	}
	if o.idempotencyKey != "" {
		req.Header.Set("Idempotency-Key", o.idempotencyKey)
	}
	var sub submitAnswer
	if err := c.do(rctx, req, &sub); err != nil {
		return nil, err
	}
	return &sub, nil
}
