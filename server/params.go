package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/utils"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Values read from a fiber.Ctx point into buffers that fasthttp reuses after
// the handler returns. Every helper here returns a copy, so the values may be
// kept by services, goroutines or queues.

// query returns a copy of a query parameter.
func query(c *fiber.Ctx, name string) string {
	return utils.CopyString(c.Query(name))
}

// param returns a copy of a path parameter, percent-decoded.
func param(c *fiber.Ctx, name string) (string, error) {
	raw := c.Params(name)
	v, err := url.PathUnescape(raw)
	if err != nil {
		return "", schema.Invalid(name, "bad percent-encoding")
	}
	return utils.CopyString(v), nil
}

// header returns a copy of a request header.
func header(c *fiber.Ctx, name string) string {
	return utils.CopyString(c.Get(name))
}

// refuseContentEncoding refuses compressed request bodies: decoding them is a
// way around the body limit (a small gzip bomb inflates without bound).
func refuseContentEncoding(c *fiber.Ctx) error {
	ce := strings.TrimSpace(c.Get(fiber.HeaderContentEncoding))
	if ce != "" && !strings.EqualFold(ce, "identity") {
		return newAPIError(http.StatusUnsupportedMediaType, "unsupported_media_type",
			"compressed request bodies are not accepted").with("content_encoding", ce)
	}
	return c.Next()
}

// decodeJSON decodes the request body into v: one JSON object, no unknown
// fields, nothing after it. Malformed JSON is 400 invalid_json.
func decodeJSON(c *fiber.Ctx, v any) error {
	if ct := c.Get(fiber.HeaderContentType); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || (mt != fiber.MIMEApplicationJSON && !strings.HasSuffix(mt, "+json")) {
			return newAPIError(http.StatusUnsupportedMediaType, "unsupported_media_type",
				"send application/json").with("content_type", utils.CopyString(ct))
		}
	}
	return decodeJSONBytes(c.Request().Body(), v)
}

// decodeJSONBytes is decodeJSON's decoder, apart for fuzzing.
func decodeJSONBytes(body []byte, v any) error {
	if len(bytes.TrimSpace(body)) == 0 {
		return newAPIError(http.StatusBadRequest, "invalid_json", "empty body: send a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return jsonError(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return newAPIError(http.StatusBadRequest, "invalid_json", "unexpected data after the JSON object")
	}
	return nil
}

func jsonError(err error) error {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		return newAPIError(http.StatusBadRequest, "invalid_json",
			fmt.Sprintf("malformed JSON at byte %d: %v", syn.Offset, syn)).with("offset", syn.Offset)
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return newAPIError(http.StatusBadRequest, "invalid_json", "malformed JSON: unexpected end")
	case errors.As(err, &typ):
		field := typ.Field
		if field == "" {
			return newAPIError(http.StatusBadRequest, "invalid_json", "the body must be a JSON object")
		}
		return schema.Invalid(field, "must be %s, not %s", typeName(typ.Type.Kind().String()), typ.Value)
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		field := strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
		return schema.Invalid(field, "unknown field")
	}
	return newAPIError(http.StatusBadRequest, "invalid_json", "malformed JSON: "+err.Error())
}

func typeName(kind string) string {
	switch kind {
	case "int", "int64", "int32", "float64", "uint", "uint64":
		return "a number"
	case "string":
		return "a string"
	case "bool":
		return "true or false"
	case "slice":
		return "an array"
	case "map", "struct":
		return "an object"
	}
	return kind
}

// jsonObject reports whether raw is a JSON object.
func jsonObject(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) > 1 && raw[0] == '{' && json.Valid(raw)
}

// checkIdempotencyKey validates an Idempotency-Key header value.
func checkIdempotencyKey(key string) error {
	if len(key) > 255 {
		return schema.Invalid("Idempotency-Key", "longer than 255 bytes")
	}
	for i := 0; i < len(key); i++ {
		if key[i] < 0x21 || key[i] > 0x7e {
			return schema.Invalid("Idempotency-Key", "must be printable ASCII without spaces")
		}
	}
	return nil
}

// intQuery parses an optional integer query parameter within [min, max].
func intQuery(c *fiber.Ctx, name string, def, min, max int) (int, error) {
	raw := c.Query(name)
	if raw == "" {
		return def, nil
	}
	n, err := strconv.Atoi(raw)
	if err != nil {
		return 0, schema.Invalid(name, "must be an integer")
	}
	if n < min || n > max {
		return 0, schema.Invalid(name, "must be between %d and %d", min, max)
	}
	return n, nil
}

// idParam parses a positive integer path parameter.
func idParam(c *fiber.Ctx, name string) (int64, error) {
	n, err := strconv.ParseInt(c.Params(name), 10, 64)
	if err != nil || n <= 0 {
		return 0, schema.Invalid(name, "must be a positive integer")
	}
	return n, nil
}
