package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

func init() {
	register(command{name: "jobs", summary: "list, show, cancel and follow the jobs of a running server", run: cmdJobs})
}

const jobsSynopsis = `[ls] [--user U] [--state S] [--limit N] | show ID | cancel ID | events ID
       (every form takes [--server URL] [--key KEY] [--frontend F] [--json]; the key defaults to
       COMFYFARM_API_KEY, then COMFYFARM_ADMIN_KEY, which needs --frontend)`

var jobVerbs = map[string][]string{"ls": nil, "show": {"ID"}, "cancel": {"ID"}, "events": {"ID"}}

func cmdJobs(ctx context.Context, e *env, args []string) error {
	verb, args := splitVerb(args, jobVerbs)
	fs := newFlagSet(e, "jobs", jobsSynopsis)
	server := fs.String("server", defaultServer(e), "comfyfarm server (env COMFYFARM_SERVER)")
	key := fs.String("key", "", "API key (default: env COMFYFARM_API_KEY, then COMFYFARM_ADMIN_KEY)")
	frontend := fs.String("frontend", "", "frontend (required with the admin key)")
	asJSON := fs.Bool("json", false, "print JSON")
	user := fs.String("user", "", "ls: only this user's jobs")
	state := fs.String("state", "", "ls: only jobs in this state")
	limit := fs.Int("limit", 20, "ls: at most this many (newest first)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if err := checkVerbArgs(e, fs, verb, pos, jobVerbs); err != nil {
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
	q := url.Values{}
	if *frontend != "" {
		q.Set("frontend", *frontend)
	}
	withQuery := func(path string) string {
		if len(q) == 0 {
			return path
		}
		return path + "?" + q.Encode()
	}

	if verb == "events" {
		// Follows the stream to the end, printing one line per event.
		return printEvents(ctx, c, withQuery("/api/v1/jobs/"+url.PathEscape(pos[0])+"/events"), e.stdout, *asJSON)
	}
	rctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	switch verb {
	case "ls":
		if *user != "" {
			q.Set("user_id", *user)
		}
		if *state != "" {
			q.Set("state", *state)
		}
		q.Set("limit", strconv.Itoa(*limit))
		var jobs []schema.Job
		if err := c.call(rctx, "GET", withQuery("/api/v1/jobs"), nil, &jobs); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(e.stdout, jobs)
		}
		return printJobs(e.stdout, jobs)
	default:
		method := "GET"
		if verb == "cancel" {
			method = "DELETE"
		}
		var job schema.Job
		if err := c.call(rctx, method, withQuery("/api/v1/jobs/"+url.PathEscape(pos[0])), nil, &job); err != nil {
			return err
		}
		if *asJSON {
			return printJSON(e.stdout, job)
		}
		return printJob(e.stdout, &job)
	}
}

// printJobs writes jobs as a table.
func printJobs(w io.Writer, jobs []schema.Job) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tFRONTEND\tUSER\tSTATE\tNODE\tATTEMPTS\tCREATED\tERROR")
	for _, j := range jobs {
		errText := ""
		if j.Error != nil {
			errText = j.Error.Code + ": " + j.Error.Message
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", j.ID, j.Frontend, j.UserID, j.State, dash(j.Node),
			j.Attempts, j.CreatedAt.Local().Format(time.DateTime), dash(oneLine(errText, 60)))
	}
	if len(jobs) == 0 {
		fmt.Fprintln(tw, "(no jobs)")
	}
	return tw.Flush()
}

// printJob writes one job's view as "key: value" lines.
func printJob(w io.Writer, j *schema.Job) error {
	tw := tabwriter.NewWriter(w, 0, 4, 1, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, v)
		}
	}
	row("id", j.ID)
	row("frontend", j.Frontend)
	row("user", j.UserID)
	row("state", string(j.State))
	if j.State == schema.JobQueued {
		row("position", strconv.Itoa(j.Position))
	}
	row("node", j.Node)
	row("attempts", strconv.Itoa(j.Attempts))
	if j.Progress != nil {
		row("progress", fmt.Sprintf("node %s %.0f%%", j.Progress.NodeID, j.Progress.Percent))
	}
	row("created", stamp(&j.CreatedAt))
	row("started", stamp(j.StartedAt))
	row("finished", stamp(j.FinishedAt))
	if j.Error != nil {
		row("error", j.Error.Code+": "+oneLine(j.Error.Message, 200))
		if j.Error.NodeID != "" {
			row("failed node", j.Error.NodeID+" ("+j.Error.NodeType+")")
		}
	}
	for i, o := range j.Outputs {
		row(fmt.Sprintf("output %d", i), o.URL)
	}
	return tw.Flush()
}

func stamp(t *time.Time) string {
	if t == nil || t.IsZero() {
		return ""
	}
	return t.Local().Format(time.RFC3339)
}

// printEvents follows a job's event stream to its end, one line per event
// (the event's JSON with --json), resuming a dropped stream.
func printEvents(ctx context.Context, c *apiClient, eventsURL string, w io.Writer, asJSON bool) error {
	var lastSeq string
	for retries := 0; ; retries++ {
		final, seq, err := streamEvents(ctx, c, eventsURL, lastSeq, func(raw string, ev schema.Event) {
			if asJSON {
				fmt.Fprintln(w, raw)
				return
			}
			fmt.Fprintln(w, eventLine(ev))
		})
		if seq != "" {
			lastSeq, retries = seq, 0
		}
		if final {
			return nil
		}
		var ae *apiError
		if ctx.Err() != nil || errors.As(err, &ae) || retries >= 5 {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Duration(retries+1) * time.Second):
		}
	}
}

// eventLine is one event in a few words.
func eventLine(ev schema.Event) string {
	s := fmt.Sprintf("%4d %s", ev.Seq, ev.Type)
	switch ev.Type {
	case schema.EventSnapshot:
		if ev.Job != nil {
			s += " " + string(ev.Job.State)
		}
	case schema.EventQueued:
		if ev.Position != nil {
			s += fmt.Sprintf(" %d ahead", *ev.Position)
		}
	case schema.EventDispatched, schema.EventRunning:
		s += " " + ev.Node
	case schema.EventProgress:
		if ev.Percent != nil {
			s += fmt.Sprintf(" node %s %.0f%%", ev.NodeID, *ev.Percent)
		}
	case schema.EventExecuted:
		s += " node " + ev.NodeID
	case schema.EventSucceeded:
		for _, o := range ev.Outputs {
			s += " " + o.URL
		}
	case schema.EventFailed:
		if ev.Error != nil {
			s += " " + ev.Error.Code + ": " + oneLine(ev.Error.Message, 120)
		}
	}
	return s
}
