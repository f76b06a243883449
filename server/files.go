package server

import (
	"errors"
	"io/fs"
	"net/http"
	"net/url"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
)

// file serves GET /files/{key} from local storage. With URL signing on, the
// query must carry a valid, unexpired signature for that key (403 otherwise).
func (s *Server) file(c *fiber.Ctx) error {
	if s.deps.Files == nil {
		return newAPIError(http.StatusNotFound, "not_found", "files are not served from this storage")
	}
	key, err := url.PathUnescape(c.Params("*"))
	if err != nil || oss.ValidKey(key) != nil {
		return newAPIError(http.StatusNotFound, "not_found", "no such file")
	}
	key = strings.Clone(key)
	q, err := url.ParseQuery(string(c.Request().URI().QueryString()))
	if err != nil {
		return newAPIError(http.StatusForbidden, "invalid_signature", "malformed query")
	}
	// Verify passes everything when signing is off.
	if err := s.deps.Files.Verify(key, q); err != nil {
		return newAPIError(http.StatusForbidden, "invalid_signature", "missing, wrong or expired signature")
	}
	f, info, err := s.deps.Files.Open(key)
	if err != nil {
		var ve *schema.ValidationError
		if errors.Is(err, schema.ErrNotFound) || errors.Is(err, fs.ErrNotExist) || errors.As(err, &ve) {
			return newAPIError(http.StatusNotFound, "not_found", "no such file")
		}
		return err
	}
	ct := info.ContentType
	if ct == "" {
		ct = fiber.MIMEOctetStream
	}
	c.Set(fiber.HeaderContentType, ct)
	c.Set("X-Content-Type-Options", "nosniff")
	c.Set(fiber.HeaderAccessControlAllowOrigin, "*") // outputs are drawn on frontends' canvases
	c.Set(fiber.HeaderContentSecurityPolicy, "default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'")
	if q.Has("signature") {
		c.Set(fiber.HeaderCacheControl, "private, max-age=300")
	} else {
		c.Set(fiber.HeaderCacheControl, "public, max-age=86400")
	}
	size := -1 // unknown: chunked
	if info.Size >= 0 {
		size = int(info.Size)
	}
	return c.SendStream(f, size) // fasthttp closes f once sent
}
