package server

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// apiError is an error with its HTTP status and snake_case code, as the
// client sees it: {"error":{"code","message","details"}}.
type apiError struct {
	Status  int            `json:"-"`
	Code    string         `json:"code"`
	Message string         `json:"message"`
	Details map[string]any `json:"details"`
	cause   error
}

func (e *apiError) Error() string {
	if e.cause != nil {
		return e.Code + ": " + e.Message + ": " + e.cause.Error()
	}
	return e.Code + ": " + e.Message
}

func (e *apiError) Unwrap() error { return e.cause }

func newAPIError(status int, code, message string) *apiError {
	return &apiError{Status: status, Code: code, Message: message}
}

func (e *apiError) with(key string, value any) *apiError {
	if e.Details == nil {
		e.Details = map[string]any{}
	}
	e.Details[key] = value
	return e
}

// localError holds a failed request's error for the access log.
const localError = "comfyfarm.error"

// statusClientClosed is logged (never sent: the client is gone) when a
// request's context ended because the client went away.
const statusClientClosed = 499

// sentinels map the vocabulary's errors to what the client sees. The
// message is the sentinel's own: the chain wrapped around it ("style: credits
// of cu2: ...") names internal steps and goes to the log only. With reason
// set, the text the sentinel was wrapped with on its right ("no node can run
// this workflow: the closest lacks X") is about the request itself and goes
// to details.reason.
var sentinels = []struct {
	err     error
	status  int
	code    string
	message string
	reason  bool
}{
	{schema.ErrNotFound, http.StatusNotFound, "not_found", "not found", false},
	{schema.ErrTerminal, http.StatusConflict, "job_terminal", "job already finished", false},
	{schema.ErrConflict, http.StatusConflict, "conflict", "conflict", false},
	{schema.ErrUnknownFrontend, http.StatusNotFound, "unknown_frontend", "unknown frontend", false},
	{schema.ErrNoNode, http.StatusServiceUnavailable, "no_node", "no node can run this workflow", true},
	{schema.ErrInsufficientCredits, http.StatusPaymentRequired, "insufficient_credits", "not enough credits", false},
	{schema.ErrTooLarge, http.StatusRequestEntityTooLarge, "too_large", "too large", true},
	{schema.ErrUnsupportedMedia, http.StatusUnsupportedMediaType, "unsupported_media_type", "unsupported media type", true},
	{schema.ErrUnauthorized, http.StatusUnauthorized, "unauthorized", "missing or unknown api key", false},
	{schema.ErrForbidden, http.StatusForbidden, "forbidden", "forbidden", true},
	{schema.ErrNotReady, http.StatusServiceUnavailable, "not_ready", "not ready", false},
}

// reasonAfter is the text err's chain carries after sentinel's own ("X: Y"
// gives Y), or "".
func reasonAfter(err, sentinel error) string {
	msg, own := err.Error(), sentinel.Error()+": "
	if i := strings.LastIndex(msg, own); i >= 0 {
		return msg[i+len(own):]
	}
	return ""
}

// classify maps any error to what the client sees.
func classify(err error) *apiError {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	var ve *schema.ValidationError
	if errors.As(err, &ve) {
		e := &apiError{Status: http.StatusBadRequest, Code: "invalid_request", Message: ve.Error(), cause: err}
		if ve.Field != "" {
			e.with("field", ve.Field)
		}
		if ve.Reason != "" {
			e.with("reason", ve.Reason)
		}
		return e
	}
	for _, s := range sentinels {
		if !errors.Is(err, s.err) {
			continue
		}
		e := &apiError{Status: s.status, Code: s.code, Message: s.message, cause: err}
		var ice *schema.InsufficientCreditsError
		var nne *schema.NoNodeError
		if errors.As(err, &nne) {
			e.Details = nne.Details()
		} else if errors.As(err, &ice) {
			e.with("balance", ice.Balance).with("cost", -ice.Change)
		} else if r := reasonAfter(err, s.err); s.reason && r != "" {
			e.with("reason", r)
		}
		return e
	}
	var fe *fiber.Error
	if errors.As(err, &fe) {
		return fiberError(fe)
	}
	if errors.Is(err, context.Canceled) {
		return &apiError{Status: statusClientClosed, Code: "client_closed", Message: "request cancelled", cause: err}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return &apiError{Status: http.StatusServiceUnavailable, Code: "timeout", Message: "timed out", cause: err}
	}
	return &apiError{Status: http.StatusInternalServerError, Code: "internal", Message: "internal error", cause: err}
}

func fiberError(fe *fiber.Error) *apiError {
	code := strings.ToLower(strings.ReplaceAll(http.StatusText(fe.Code), " ", "_"))
	switch fe.Code {
	case http.StatusRequestEntityTooLarge:
		code = "too_large"
	case http.StatusUnsupportedMediaType:
		code = "unsupported_media_type"
	case http.StatusInternalServerError:
		return &apiError{Status: fe.Code, Code: "internal", Message: "internal error", cause: fe}
	}
	if code == "" {
		code = "error"
	}
	msg := fe.Message
	if fe.Code == http.StatusNotFound && strings.HasPrefix(msg, "Cannot ") {
		msg = "no such route"
	}
	return &apiError{Status: fe.Code, Code: code, Message: msg, cause: fe}
}

// handleError is the app's one ErrorHandler. It writes the error body; only
// 5xx are logged, and a 500 never tells the client more than "internal error".
func (s *Server) handleError(c *fiber.Ctx, err error) error {
	ae := classify(err)
	if ae.cause != nil {
		c.Locals(localError, ae.cause) // for the access log: the whole chain
	}
	if ae.Status >= 500 {
		attrs := []any{"err", err, "method", c.Method(), "path", c.Path(), "status", ae.Status}
		if rid, ok := c.Locals("requestid").(string); ok {
			attrs = append(attrs, "request_id", rid)
		}
		if ae.Status == http.StatusInternalServerError {
			s.log.Error("request failed", attrs...)
		} else {
			s.log.Warn("request not served", attrs...)
		}
	}
	if ae.Status == statusClientClosed {
		c.Status(ae.Status)
		return nil
	}
	c.Set(fiber.HeaderContentType, fiber.MIMEApplicationJSONCharsetUTF8)
	c.Set(fiber.HeaderCacheControl, "no-store")
	if ae.Details == nil {
		ae.Details = map[string]any{} // the contract's shape always has details
	}
	return c.Status(ae.Status).JSON(fiber.Map{"error": ae})
}
