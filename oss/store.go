package oss

import (
	"context"
	"io"
	"net/url"
	"path"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Store keeps objects under keys. Every backend (Local, Aliyun, S3) passes
// the same conformance suite.
type Store interface {
	// Put stores size bytes read from r under key (overwriting any object
	// there). size is the exact length r yields, or -1 when unknown. An empty
	// contentType is derived from the key's extension.
	Put(ctx context.Context, key string, r io.Reader, size int64, contentType string) error
	// Get opens the object; the caller closes the reader. A missing key gives
	// an error matching schema.ErrNotFound. ctx must stay live while the body
	// is read.
	Get(ctx context.Context, key string) (io.ReadCloser, ObjectInfo, error)
	// Delete removes the object; a missing key is not an error.
	Delete(ctx context.Context, key string) error
	// URL builds, now, the address a browser downloads the object from: a
	// public (CDN) base plus the key, or a signed URL valid for the configured
	// TTL.
	URL(ctx context.Context, key string) (string, error)
	// Ping reports whether the store is reachable and usable (readiness).
	Ping(ctx context.Context) error
}

// ObjectInfo describes a stored object.
type ObjectInfo struct {
	Size        int64
	ContentType string
	ETag        string
}

// MaxKeyLen is the longest key, in bytes, that ValidKey accepts (the Aliyun
// OSS limit; 1023 bytes).
const MaxKeyLen = 1023

// maxSegmentLen is the longest path segment (a file name on common file
// systems).
const maxSegmentLen = 255

// ValidKey reports whether key is a well-formed object key, returning a
// *schema.ValidationError naming the problem if not. A valid key is 1 to
// MaxKeyLen bytes of UTF-8 without control characters or backslashes, made of
// "/"-separated segments that are each non-empty, at most 255 bytes, and do not
// start with "." (so no "." or ".." segment, and no hidden names, which the
// local store reserves for its own bookkeeping). Such a key joined to a
// directory never leaves it.
func ValidKey(key string) error {
	switch {
	case key == "":
		return schema.Invalid("key", "empty object key")
	case len(key) > MaxKeyLen:
		return schema.Invalid("key", "object key longer than %d bytes", MaxKeyLen)
	case !utf8.ValidString(key):
		return schema.Invalid("key", "object key is not valid UTF-8")
	case key[0] == '/':
		return schema.Invalid("key", "object key starts with \"/\"")
	}
	for _, r := range key {
		if r == '\\' {
			return schema.Invalid("key", "object key contains a backslash")
		}
		if unicode.IsControl(r) {
			return schema.Invalid("key", "object key contains a control character")
		}
	}
	for seg := range strings.SplitSeq(key, "/") {
		switch {
		case seg == "":
			return schema.Invalid("key", "object key has an empty path segment")
		case seg[0] == '.':
			return schema.Invalid("key", "object key has a segment starting with \".\"")
		case len(seg) > maxSegmentLen:
			return schema.Invalid("key", "object key has a segment longer than %d bytes", maxSegmentLen)
		}
	}
	return nil
}

// escapeKey escapes each segment of a valid key for use in a URL path,
// keeping the "/" separators.
func escapeKey(key string) string {
	segs := strings.Split(key, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	return strings.Join(segs, "/")
}

// joinURL appends an escaped key to a base URL, adding a "/" if base lacks one.
func joinURL(base, key string) string {
	if !strings.HasSuffix(base, "/") {
		base += "/"
	}
	return base + escapeKey(key)
}

// contentTypeFor returns ct, or when it is empty the type the key's extension
// names, or application/octet-stream.
func contentTypeFor(key, ct string) string {
	if ct != "" {
		return ct
	}
	if t, ok := typeByExt[strings.ToLower(strings.TrimPrefix(path.Ext(key), "."))]; ok {
		return t
	}
	return octetStream
}

var (
	_ Store = (*Local)(nil)
	_ Store = (*Aliyun)(nil)
)
