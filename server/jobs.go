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
// multipart variant, where workflow and metadata are JSON text).
type submitBody struct {
	Frontend string          `json:"frontend"`
	UserID   string          `json:"user_id"`
	Workflow json.RawMessage `json:"workflow"`
	Priority int             `json:"priority"`
	Metadata json.RawMessage `json:"metadata"`
	// Requirements narrow the nodes the job may run on.
	Requirements *schema.Requirements `json:"requirements"`
}

// validate checks what the server can check cheaply; the graph itself is the
// JobService's to validate.
func (b *submitBody) validate() error {
	if err := checkUserID("user_id", b.UserID); err != nil {
		return err
	}
	if len(b.Workflow) == 0 || string(b.Workflow) == "null" {
		return schema.Invalid("workflow", "required")
	}
	if !jsonObject(b.Workflow) {
		return schema.Invalid("workflow", "must be a JSON object (an API-format graph)")
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
// images in the field "images".
func (s *Server) jobSubmit(c *fiber.Ctx) error {
	jobs, err := s.jobService()
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
	job, err := jobs.Submit(c.UserContext(), schema.SubmitParams{
		Frontend:       frontend,
		UserID:         b.UserID,
		Workflow:       b.Workflow,
		Priority:       b.Priority,
		Metadata:       b.Metadata,
		IdempotencyKey: key,
		Inputs:         inputs,
		Requirements:   b.Requirements,
	})
	if err != nil {
		return err
	}
	return c.Status(http.StatusAccepted).JSON(submitResponse{
		ID:        job.ID,
		State:     job.State,
		Position:  job.Position,
		EventsURL: "/api/v1/jobs/" + url.PathEscape(job.ID) + "/events?token=" + url.QueryEscape(s.tokens.mint(job.ID, frontend)),
	})
}

// decodeMultipartSubmit reads the multipart variant: form fields frontend,
// user_id, workflow (JSON text), priority, metadata (JSON text), and files in
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
		case "workflow":
			b.Workflow = json.RawMessage(v)
			if !json.Valid(b.Workflow) {
				return nil, newAPIError(http.StatusBadRequest, "invalid_json", "workflow is not valid JSON").with("field", "workflow")
			}
		case "metadata":
			b.Metadata = json.RawMessage(v)
			if !json.Valid(b.Metadata) {
				return nil, newAPIError(http.StatusBadRequest, "invalid_json", "metadata is not valid JSON").with("field", "metadata")
			}
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

func (s *Server) jobGet(c *fiber.Ctx) error {
	return s.oneJob(c, JobService.Job)
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
