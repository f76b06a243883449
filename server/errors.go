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

// statusClientClosed is logged (never sent: the client is gone) when a
// request's context ended because the client went away.
const statusClientClosed = 499

var sentinels = []struct {
	err     error
	status  int
	code    string
	message string
}{
	{schema.ErrNotFound, http.StatusNotFound, "not_found", "not found"},
	{schema.ErrTerminal, http.StatusConflict, "job_terminal", "job already finished"},
	{schema.ErrConflict, http.StatusConflict, "conflict", "conflict"},
	{schema.ErrUnknownFrontend, http.StatusNotFound, "unknown_frontend", "unknown frontend"},
	{schema.ErrNoNode, http.StatusServiceUnavailable, "no_node", "no node can run this workflow"},
	{schema.ErrInsufficientCredits, http.StatusPaymentRequired, "insufficient_credits", "not enough credits"},
	{schema.ErrTooLarge, http.StatusRequestEntityTooLarge, "too_large", "too large"},
	{schema.ErrUnsupportedMedia, http.StatusUnsupportedMediaType, "unsupported_media_type", "unsupported media type"},
	{schema.ErrUnauthorized, http.StatusUnauthorized, "unauthorized", "missing or unknown api key"},
	{schema.ErrForbidden, http.StatusForbidden, "forbidden", "key not valid for this frontend"},
	{schema.ErrNotReady, http.StatusServiceUnavailable, "not_ready", "not ready"},
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
		if errors.Is(err, s.err) {
			msg := s.message
			if s.status < 500 || s.status == http.StatusServiceUnavailable {
				msg = err.Error()
			}
			return &apiError{Status: s.status, Code: s.code, Message: msg, cause: err}
		}
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
