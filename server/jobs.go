package server

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Submission bounds beyond the configured body and upload limits.
const (
	maxUploadFiles   = 32
	maxFilenameBytes = 255
	defaultJobLimit  = 20
	maxJobLimit      = 100
)

// submitBody is the JSON body of POST /jobs (and the form fields of the
// multipart variant, where workflow, prompt, inputs and metadata are JSON
// text). The workflow is one of: workflow (an API-format graph), prompt
// (the same, in ComfyUI's own /prompt body, whose client_id and extra_data
// are accepted and not used), or template with its inputs.
type submitBody struct {
	Frontend string          `json:"frontend"`
	UserID   string          `json:"user_id"`
	Workflow json.RawMessage `json:"workflow"`
	Priority int             `json:"priority"`
	Metadata json.RawMessage `json:"metadata"`
	Template string          `json:"template"`
	Inputs   json.RawMessage `json:"inputs"`

	Prompt    json.RawMessage `json:"prompt"`
	ClientID  string          `json:"client_id"`
	ExtraData json.RawMessage `json:"extra_data"`
	// WebhookURL overrides the frontend's webhook address for this job.
	WebhookURL string `json:"webhook_url"`
	// Requirements narrow the nodes the job may run on.
	Requirements *schema.Requirements `json:"requirements"`
}

// promptUser owns the jobs of a ComfyUI-shaped body that names no user.
const promptUser = "comfy"

// validate checks what the server can check cheaply; the graph itself is the
// JobService's to validate.
func (b *submitBody) validate() error {
	if hasValue(b.Prompt) {
		if hasValue(b.Workflow) {
			return schema.Invalid("prompt", "give the graph as workflow or as prompt, not both")
		}
		if !jsonObject(b.Prompt) {
			return schema.Invalid("prompt", "must be a JSON object (an API-format graph)")
		}
		b.Workflow, b.Prompt = b.Prompt, nil
		if b.UserID == "" {
			b.UserID = promptUser
		}
	}
	if len(b.ClientID) > 256 {
		return schema.Invalid("client_id", "longer than 256 bytes")
	}
	if hasValue(b.ExtraData) && !jsonObject(b.ExtraData) {
		return schema.Invalid("extra_data", "must be a JSON object")
	}
	if err := checkUserID("user_id", b.UserID); err != nil {
		return err
	}
	if b.Template != "" {
		if hasValue(b.Workflow) {
			return schema.Invalid("template", "give a template or a workflow, not both")
		}
		if _, _, err := schema.ParseTemplateRef(b.Template); err != nil {
			return err
		}
	} else {
		if hasValue(b.Inputs) {
			return schema.Invalid("inputs", "inputs are the values of a template: name it in template")
		}
		if len(b.Workflow) == 0 || string(b.Workflow) == "null" {
			return schema.Invalid("workflow", "required (or a template)")
		}
		if !jsonObject(b.Workflow) {
			return schema.Invalid("workflow", "must be a JSON object (an API-format graph)")
		}
	}
	if b.Priority < schema.MinPriority || b.Priority > schema.MaxPriority {
		return schema.Invalid("priority", "must be between %d and %d", schema.MinPriority, schema.MaxPriority)
	}
	if len(b.Metadata) > 0 && string(b.Metadata) != "null" {
		if len(b.Metadata) > schema.MaxMetadataBytes {
			return schema.Invalid("metadata", "larger than %d bytes", schema.MaxMetadataBytes)
		}
		if !jsonObject(b.Metadata) {
			return schema.Invalid("metadata", "must be a JSON object")
		}
	} else {
		b.Metadata = nil
	}
	req, err := b.Requirements.Check()
	if err != nil {
		return err
	}
	b.Requirements = req
	return nil
}

// submitResponse is the 202 body of POST /jobs.
type submitResponse struct {
	ID        string          `json:"id"`
	State     schema.JobState `json:"state"`
	Position  int             `json:"position"`
	EventsURL string          `json:"events_url"`
}

// jobSubmit accepts a job as JSON, or as multipart/form-data with input
// images in the field "images". With ?wait= it answers once the job has
// finished (200 with the job view), or when the wait runs out (202 with the
// view as it is then).
func (s *Server) jobSubmit(c *fiber.Ctx) error {
	jobs, err := s.jobService()
	if err != nil {
		return err
	}
	wait, err := waitQuery(c)
	if err != nil {
		return err
	}
	var (
		b      submitBody
		inputs []schema.InputFile
	)
	mt, _, _ := mime.ParseMediaType(c.Get(fiber.HeaderContentType))
	if mt == fiber.MIMEMultipartForm {
		inputs, err = s.decodeMultipartSubmit(c, &b)
	} else {
		err = decodeJSON(c, &b)
	}
	if err != nil {
		return err
	}
	if err := b.validate(); err != nil {
		return err
	}
	key := header(c, "Idempotency-Key")
	if err := checkIdempotencyKey(key); err != nil {
		return err
	}
	frontend, err := s.frontendName(c, b.Frontend)
	if err != nil {
		return err
	}
	var ref string
	if b.Template == "" {
		if allowed, ok := s.cfg.RawWorkflows[frontend]; ok && !allowed && !principalOf(c).admin {
			return newAPIError(http.StatusForbidden, "raw_workflows_disabled",
				"this frontend submits templates only: send template and inputs instead of a workflow").
				with("frontend", frontend)
		}
	} else {
		uploads := make(map[string]bool, len(inputs))
		for _, in := range inputs {
			uploads[in.Filename] = true
		}
		if b.Workflow, ref, err = s.expandTemplate(c.UserContext(), frontend, b.Template, b.Inputs, uploads); err != nil {
			return err
		}
	}
	if err := s.checkWebhookURL(frontend, b.WebhookURL); err != nil {
		return err
	}
	job, err := jobs.Submit(c.UserContext(), schema.SubmitParams{
		Frontend:       frontend,
		UserID:         b.UserID,
		Workflow:       b.Workflow,
		Priority:       b.Priority,
		Metadata:       b.Metadata,
		IdempotencyKey: key,
		Inputs:         inputs,
		Template:       ref,
		WebhookURL:     b.WebhookURL,
		Requirements:   b.Requirements,
	})
	if err != nil {
		return err
	}
	eventsURL := s.eventsURL(job.ID, frontend)
	if wait > 0 {
		if job, err = s.awaitJob(c, jobs, frontend, job.ID, wait); err != nil {
			return err
		}
		if err := s.outputURLs(c.UserContext(), job); err != nil {
			return err
		}
		return c.Status(statusFor(job, http.StatusAccepted)).JSON(waitedJob{Job: job, EventsURL: eventsURL})
	}
	return c.Status(http.StatusAccepted).JSON(submitResponse{
		ID:        job.ID,
		State:     job.State,
		Position:  job.Position,
		EventsURL: eventsURL,
	})
}

// eventsURL is the address of a job's event stream with a token for it:
// absolute when the public URL is known, else a path.
func (s *Server) eventsURL(id, frontend string) string {
	path := "/api/v1/jobs/" + url.PathEscape(id) + "/events?token=" + url.QueryEscape(s.tokens.mint(id, frontend))
	return strings.TrimRight(s.cfg.PublicURL, "/") + path
}

// decodeMultipartSubmit reads the multipart variant: form fields frontend,
// user_id, workflow or prompt (JSON text), template and inputs (JSON text),
// client_id, priority, metadata and extra_data (JSON text), and files in
// "images", each at most Config.MaxUploadBytes.
func (s *Server) decodeMultipartSubmit(c *fiber.Ctx, b *submitBody) ([]schema.InputFile, error) {
	form, err := c.MultipartForm()
	if err != nil {
		if errors.Is(err, multipart.ErrMessageTooLarge) {
			return nil, newAPIError(http.StatusRequestEntityTooLarge, "too_large", "multipart form too large")
		}
		return nil, newAPIError(http.StatusBadRequest, "invalid_multipart", "malformed multipart form")
	}
	for name, values := range form.Value {
		if len(values) != 1 {
			return nil, schema.Invalid(name, "given more than once")
		}
		v := values[0]
		switch name {
		case "frontend":
			b.Frontend = v
		case "user_id":
			b.UserID = v
		case "workflow", "prompt", "inputs", "metadata", "extra_data":
			raw := json.RawMessage(v)
			if !json.Valid(raw) {
				return nil, newAPIError(http.StatusBadRequest, "invalid_json", name+" is not valid JSON").with("field", name)
			}
			*map[string]*json.RawMessage{
				"workflow": &b.Workflow, "prompt": &b.Prompt, "inputs": &b.Inputs,
				"metadata": &b.Metadata, "extra_data": &b.ExtraData,
			}[name] = raw
		case "template":
			b.Template = v
		case "client_id":
			b.ClientID = v
		case "webhook_url":
			b.WebhookURL = v
		case "requirements":
			var req schema.Requirements
			if err := decodeJSONBytes([]byte(v), &req); err != nil {
				return nil, err
			}
			b.Requirements = &req
		case "priority":
			p, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				return nil, schema.Invalid("priority", "must be an integer")
			}
			b.Priority = p
		default:
			return nil, schema.Invalid(name, "unknown field")
		}
	}
	var inputs []schema.InputFile
	for field, files := range form.File {
		if field != "images" {
			return nil, schema.Invalid(field, "unknown file field: send files in \"images\"")
		}
		if len(files) > maxUploadFiles {
			return nil, schema.Invalid("images", "more than %d files", maxUploadFiles)
		}
		seen := map[string]bool{}
		for _, fh := range files {
			if err := checkFilename(fh.Filename); err != nil {
				return nil, err
			}
			if seen[fh.Filename] {
				return nil, schema.Invalid("images", "two files named %q", fh.Filename)
			}
			seen[fh.Filename] = true
			if fh.Size > s.cfg.MaxUploadBytes {
				return nil, newAPIError(http.StatusRequestEntityTooLarge, "too_large", "an uploaded file is larger than the limit").
					with("file", fh.Filename).with("limit_bytes", s.cfg.MaxUploadBytes)
			}
			if fh.Size == 0 {
				return nil, schema.Invalid("images", "file %q is empty", fh.Filename)
			}
			inputs = append(inputs, schema.InputFile{
				Filename: fh.Filename,
				Size:     fh.Size,
				Open:     func() (io.ReadCloser, error) { return fh.Open() },
			})
		}
	}
	return inputs, nil
}

// checkFilename refuses names a LoadImage input could not refer to, or that
// could climb out of a directory.
func checkFilename(name string) error {
	switch {
	case name == "" || name == "." || name == "..":
		return schema.Invalid("images", "a file has no usable name")
	case len(name) > maxFilenameBytes:
		return schema.Invalid("images", "a file name is longer than %d bytes", maxFilenameBytes)
	case !utf8.ValidString(name):
		return schema.Invalid("images", "a file name is not valid UTF-8")
	case strings.ContainsAny(name, "/\\\x00"):
		return schema.Invalid("images", "file name %q contains a path separator", name)
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f {
			return schema.Invalid("images", "a file name contains a control character")
		}
	}
	return nil
}

// jobGet answers a job view; with ?wait= once the job has finished, or when
// the wait runs out (its view then).
func (s *Server) jobGet(c *fiber.Ctx) error {
	wait, err := waitQuery(c)
	if err != nil {
		return err
	}
	if wait == 0 {
		return s.oneJob(c, JobService.Job)
	}
	return s.oneJob(c, func(jobs JobService, ctx context.Context, frontend, id string) (*schema.Job, error) {
		job, err := jobs.Job(ctx, frontend, id)
		if err != nil || job.State.Terminal() {
			return job, err
		}
		return s.awaitJob(c, jobs, frontend, id, wait)
	})
}

// oneJob runs a JobService call on the job named in the path, for the
// caller's frontend, and answers with the job view.
func (s *Server) oneJob(c *fiber.Ctx, call func(JobService, context.Context, string, string) (*schema.Job, error)) error {
	jobs, err := s.jobService()
	if err != nil {
		return err
	}
	id, err := jobID(c)
	if err != nil {
		return err
	}
	frontend, err := s.frontendName(c, "")
	if err != nil {
		return err
	}
	job, err := call(jobs, c.UserContext(), frontend, id)
	if err != nil {
		return err
	}
	if err := s.outputURLs(c.UserContext(), job); err != nil {
		return err
	}
	return c.JSON(job)
}

// jobList lists a frontend's jobs as a JSON array, newest first; before=ID
// (the last id of a page) pages on.
func (s *Server) jobList(c *fiber.Ctx) error {
	jobs, err := s.jobService()
	if err != nil {
		return err
	}
	f := schema.JobFilter{
		UserID: query(c, "user_id"),
		State:  schema.JobState(query(c, "state")),
		Before: query(c, "before"),
	}
	if f.UserID != "" {
		if err := checkUserID("user_id", f.UserID); err != nil {
			return err
		}
	}
	if f.State != "" && !f.State.Valid() {
		return schema.Invalid("state", "unknown state %q", string(f.State))
	}
	if err := checkJobID("before", f.Before, true); err != nil {
		return err
	}
	if f.Limit, err = intQuery(c, "limit", defaultJobLimit, 1, maxJobLimit); err != nil {
		return err
	}
	if f.Frontend, err = s.frontendName(c, ""); err != nil {
		return err
	}
	return s.answerJobs(c, jobs, f)
}

// answerJobs lists the jobs f selects, newest first, with their output URLs:
// a JSON array, empty rather than null.
func (s *Server) answerJobs(c *fiber.Ctx, jobs JobService, f schema.JobFilter) error {
	list, err := jobs.Jobs(c.UserContext(), f)
	if err != nil {
		return err
	}
	if list == nil {
		list = []schema.Job{}
	}
	for i := range list {
		if err := s.outputURLs(c.UserContext(), &list[i]); err != nil {
			return err
		}
	}
	return c.JSON(list)
}

// jobCancel cancels a job; 409 job_terminal if it has already finished.
func (s *Server) jobCancel(c *fiber.Ctx) error {
	return s.oneJob(c, JobService.Cancel)
}

// queueStatus answers "is my job running now, and if not, how many are ahead".
func (s *Server) queueStatus(c *fiber.Ctx) error {
	jobs, err := s.jobService()
	if err != nil {
		return err
	}
	id := query(c, "job_id")
	if err := checkJobID("job_id", id, false); err != nil {
		return err
	}
	frontend, err := s.frontendName(c, "")
	if err != nil {
		return err
	}
	st, err := jobs.QueueStatus(c.UserContext(), frontend, id)
	if err != nil {
		return err
	}
	return c.JSON(st)
}

func jobID(c *fiber.Ctx) (string, error) {
	id, err := param(c, "id")
	if err != nil {
		return "", err
	}
	return id, checkJobID("id", id, false)
}

// checkJobID checks the form of a job id (ULIDs are 26 characters; other
// ids are allowed but kept short and plain).
func checkJobID(field, id string, optional bool) error {
	if id == "" {
		if optional {
			return nil
		}
		return schema.Invalid(field, "required")
	}
	if len(id) > 64 {
		return schema.Invalid(field, "longer than 64 bytes")
	}
	for i := 0; i < len(id); i++ {
		ch := id[i]
		if !(ch >= '0' && ch <= '9' || ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch == '-' || ch == '_') {
			return schema.Invalid(field, "must be letters, digits, - or _")
		}
	}
	return nil
}
