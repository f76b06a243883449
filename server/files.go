package server

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
)

// file serves GET /files/{key} from local storage. With URL signing on, the
// query must carry a valid, unexpired signature for that key (403 otherwise).
// It answers conditional requests (If-None-Match, If-Modified-Since: 304)
// and one byte range (206 with Content-Range, 416 past the end; If-Range),
// so video players can seek.
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
	st, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return err
	}
	size := st.Size()
	modTime := st.ModTime().UTC().Truncate(time.Second) // HTTP dates have seconds
	etag := entityTag(info.ETag, size, st.ModTime())
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
	c.Set(fiber.HeaderETag, etag)
	c.Set(fiber.HeaderLastModified, modTime.Format(http.TimeFormat))
	c.Set(fiber.HeaderAcceptRanges, "bytes")

	if notModified(c.Get(fiber.HeaderIfNoneMatch), c.Get(fiber.HeaderIfModifiedSince), etag, modTime) {
		_ = f.Close()
		c.Status(http.StatusNotModified)
		return nil
	}
	if raw := c.Get(fiber.HeaderRange); raw != "" && ifRange(c.Get(fiber.HeaderIfRange), etag, modTime) {
		start, n, err := parseRange(raw, size)
		switch {
		case errors.Is(err, errRangeUnsatisfiable):
			_ = f.Close()
			c.Set(fiber.HeaderContentRange, "bytes */"+strconv.FormatInt(size, 10))
			return newAPIError(http.StatusRequestedRangeNotSatisfiable, "range_not_satisfiable",
				"the range is outside the file").with("size", size)
		case err == nil:
			if _, err := f.Seek(start, io.SeekStart); err != nil {
				_ = f.Close()
				return err
			}
			c.Set(fiber.HeaderContentRange, fmt.Sprintf("bytes %d-%d/%d", start, start+n-1, size))
			c.Status(http.StatusPartialContent)
			return c.SendStream(readCloser{io.LimitReader(f, n), f}, int(n))
		}
		// A Range this server does not take (another unit, several ranges,
		// bad syntax) is ignored: the whole file, 200.
	}
	return c.SendStream(f, int(size)) // fasthttp closes f once sent
}

// readCloser reads from Reader and closes Closer (fasthttp closes a body
// stream that is an io.Closer once it is sent).
type readCloser struct {
	io.Reader
	io.Closer
}

// entityTag is the object's strong ETag: the stored content hash, or else
// one made of its size and modification time.
func entityTag(stored string, size int64, mod time.Time) string {
	if stored != "" {
		return `"` + strings.Trim(stored, `"`) + `"`
	}
	return fmt.Sprintf(`"%x-%x"`, size, mod.UnixNano())
}

// notModified applies If-None-Match (which, when present, decides alone) and
// If-Modified-Since to a GET or HEAD (RFC 9110 §13.2.2).
func notModified(ifNoneMatch, ifModifiedSince, etag string, mod time.Time) bool {
	if ifNoneMatch != "" {
		return etagListMatch(ifNoneMatch, etag, true)
	}
	if ifModifiedSince != "" {
		t, err := http.ParseTime(ifModifiedSince)
		return err == nil && !mod.After(t)
	}
	return false
}

// ifRange reports whether a Range may be applied: no If-Range, or one that
// names the current representation (strong ETag, or exactly its
// Last-Modified date).
func ifRange(v, etag string, mod time.Time) bool {
	v = strings.TrimSpace(v)
	switch {
	case v == "":
		return true
	case strings.HasPrefix(v, `"`):
		return v == etag
	case strings.HasPrefix(v, "W/"):
		return false // a weak tag never matches for a range
	}
	t, err := http.ParseTime(v)
	return err == nil && t.Equal(mod)
}

// etagListMatch reports whether a comma-separated list of entity tags (or
// "*") holds etag; weak compares opaque tags only, ignoring W/.
func etagListMatch(list, etag string, weak bool) bool {
	for _, tag := range strings.Split(list, ",") {
		tag = strings.TrimSpace(tag)
		if tag == "*" {
			return true
		}
		if weak {
			tag = strings.TrimPrefix(tag, "W/")
		}
		if tag == etag {
			return true
		}
	}
	return false
}

var (
	errRangeUnsatisfiable = errors.New("range not satisfiable")
	errRangeIgnored       = errors.New("range ignored")
)

// parseRange reads a Range header of one byte range against a file of size
// bytes: "bytes=a-b", "bytes=a-" or "bytes=-n". It returns the first byte
// and the length. errRangeUnsatisfiable: the range starts past the end (416);
// errRangeIgnored: anything else it does not take (then 200, whole file).
func parseRange(h string, size int64) (start, n int64, err error) {
	spec, ok := strings.CutPrefix(h, "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return 0, 0, errRangeIgnored
	}
	first, last, ok := strings.Cut(strings.TrimSpace(spec), "-")
	if !ok {
		return 0, 0, errRangeIgnored
	}
	if first == "" { // the last n bytes
		k, err := strconv.ParseInt(last, 10, 64)
		if err != nil || k < 0 {
			return 0, 0, errRangeIgnored
		}
		if k == 0 || size == 0 {
			return 0, 0, errRangeUnsatisfiable
		}
		k = min(k, size)
		return size - k, k, nil
	}
	a, err := strconv.ParseInt(first, 10, 64)
	if err != nil || a < 0 {
		return 0, 0, errRangeIgnored
	}
	b := size - 1
	if last != "" {
		if b, err = strconv.ParseInt(last, 10, 64); err != nil || b < a {
			return 0, 0, errRangeIgnored
		}
		b = min(b, size-1)
	}
	if a >= size {
		return 0, 0, errRangeUnsatisfiable
	}
	return a, b - a + 1, nil
}
