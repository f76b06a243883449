package server

import (
	"context"
	"errors"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// viewReadTimeout bounds one /view download from storage.
const viewReadTimeout = 10 * time.Minute

// view serves GET /view?filename=&subfolder=&type=: an output of one of the
// caller's jobs, streamed from storage. The subfolder is the job id and the
// filename one of the names outputNames gives; nothing the client sends is
// ever a path: it only selects among the job's stored outputs. As in
// ComfyUI, a filename with a path in it is 400, a subfolder climbing out is
// 403, anything else that names no output of the caller's is 404.
func (a *comfyAPI) view(c *fiber.Ctx) error {
	store := a.s.deps.Store
	if store == nil {
		return newAPIError(http.StatusNotFound, "not_found", "no storage")
	}
	name, sub, typ := c.Query("filename"), c.Query("subfolder"), c.Query("type")
	for _, t := range []string{"output", "input", "temp"} {
		if n, ok := strings.CutSuffix(name, " ["+t+"]"); ok {
			name, typ = n, t
		}
	}
	if typ == "" {
		typ = "output"
	}
	switch {
	case name == "":
		return newAPIError(http.StatusNotFound, "not_found", "no filename")
	case strings.HasPrefix(name, "/") || strings.Contains(name, "..") || strings.ContainsAny(name, "\\\x00"):
		return newAPIError(http.StatusBadRequest, "invalid_filename", "filename must be a plain name")
	case strings.Contains(sub, ".."), strings.HasPrefix(sub, "/"):
		return newAPIError(http.StatusForbidden, "forbidden", "subfolder outside the outputs")
	case typ != "output" && typ != "temp" && typ != "input":
		return newAPIError(http.StatusBadRequest, "invalid_type", "type must be output, temp or input")
	}
	notFound := newAPIError(http.StatusNotFound, "not_found", "no such file")
	if typ == "input" || checkJobID("subfolder", sub, false) != nil {
		return notFound
	}
	jobs, err := a.s.jobService()
	if err != nil {
		return err
	}
	who := comfyWhoOf(c)
	j, err := jobs.Job(c.UserContext(), who.frontend, sub)
	if errors.Is(err, schema.ErrNotFound) {
		return notFound
	}
	if err != nil {
		return err
	}
	if j.UserID != who.user {
		return notFound
	}
	key := ""
	var out schema.Output
	for i, n := range outputNames(j) {
		if n == name && refType(j.Outputs[i]) == typ {
			key, out = j.Outputs[i].Key, j.Outputs[i]
			break
		}
	}
	if key == "" {
		return notFound
	}
	// The body is read after the handler returns: its context lives until
	// fasthttp closes the body.
	ctx, cancel := context.WithTimeout(context.Background(), viewReadTimeout)
	body, info, err := store.Get(ctx, key)
	if err != nil {
		cancel()
		if errors.Is(err, schema.ErrNotFound) {
			return notFound
		}
		return err
	}
	ct := info.ContentType
	if ct == "" {
		ct = out.ContentType
	}
	if ct == "" || strings.HasPrefix(ct, "text/") || strings.Contains(ct, "javascript") {
		ct = fiber.MIMEOctetStream
	}
	c.Set(fiber.HeaderContentType, ct)
	c.Set("X-Content-Type-Options", "nosniff")
	c.Set(fiber.HeaderCacheControl, "private, max-age=300")
	c.Set(fiber.HeaderContentDisposition, mime.FormatMediaType("inline", map[string]string{"filename": name}))
	size := int(info.Size)
	if info.Size <= 0 {
		size = -1
	}
	return c.SendStream(readCloser{body, closeFunc(func() error { defer cancel(); return body.Close() })}, size)
}

// closeFunc adapts a function to io.Closer.
type closeFunc func() error

func (f closeFunc) Close() error { return f() }
