package oss

import (
	"context"
	"crypto/hmac"
	"crypto/md5"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

// LocalConfig configures a Local store.
type LocalConfig struct {
	// Dir holds the objects; it is created if missing.
	Dir string
	// BaseURL is where the server serves Dir, e.g. public_url + "/files/".
	BaseURL string
	// SignURLs makes URL return signed, expiring links (checked by Verify).
	SignURLs bool
	// Secret is the HMAC key for signed URLs; required when SignURLs is set.
	Secret []byte
	// TTL is how long a signed URL stays valid (default 1h).
	TTL time.Duration
	// NowFunc is the clock (default time.Now).
	NowFunc func() time.Time
}

// Local is a Store on the local file system. Object "a/b.png" is the file
// Dir/a/b.png; its content type and ETag live in a sidecar under Dir/.meta,
// and uploads are written to Dir/.tmp, synced, then renamed into place, so a
// reader never sees a partial object. All access goes through an os.Root
// opened on Dir, and symbolic links inside Dir are refused, so no key reaches
// outside Dir.
//
// Keys map to paths, so one key cannot be a directory prefix of another
// ("a" and "a/b" cannot both exist).
type Local struct {
	root   *os.Root
	dir    string
	base   string
	sign   bool
	secret []byte
	ttl    time.Duration
	now    func() time.Time
}

const (
	localTmpDir  = ".tmp"
	localMetaDir = ".meta"
)

// NewLocal opens (creating if needed) a local store in cfg.Dir. Close it when
// done.
func NewLocal(cfg LocalConfig) (*Local, error) {
	if cfg.Dir == "" {
		return nil, errors.New("local store: dir is empty")
	}
	if cfg.SignURLs && len(cfg.Secret) == 0 {
		return nil, errors.New("local store: signed URLs need a secret")
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("local store: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("local store: %w", err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("local store: %w", err)
	}
	for _, d := range []string{localTmpDir, localMetaDir} {
		if err := root.MkdirAll(d, 0o755); err != nil {
			_ = root.Close()
			return nil, fmt.Errorf("local store: %w", err)
		}
	}
	l := &Local{
		root:   root,
		dir:    dir,
		base:   cfg.BaseURL,
		sign:   cfg.SignURLs,
		secret: append([]byte(nil), cfg.Secret...),
		ttl:    cfg.TTL,
		now:    cfg.NowFunc,
	}
	if l.ttl <= 0 {
		l.ttl = time.Hour
	}
	if l.now == nil {
		l.now = time.Now
	}
	return l, nil
}

// Close releases the store's directory handle.
func (l *Local) Close() error { return l.root.Close() }

// path resolves a valid key to its file name, checking lexically that it stays
// inside Dir (a second guard; the os.Root is the first).
func (l *Local) path(key string) (string, error) {
	if err := ValidKey(key); err != nil {
		return "", err
	}
	p := filepath.Join(l.dir, filepath.FromSlash(key))
	prefix := l.dir
	if !strings.HasSuffix(prefix, string(filepath.Separator)) {
		prefix += string(filepath.Separator)
	}
	if !strings.HasPrefix(p, prefix) {
		return "", schema.Invalid("key", "object key leaves the store")
	}
	return p, nil
}

// localMeta is the sidecar of one object.
type localMeta struct {
	ContentType string `json:"content_type"`
	Size        int64  `json:"size"`
	ETag        string `json:"etag"`
}

func metaName(key string) string { return localMetaDir + "/" + key }

// Put writes the object atomically: to a temporary file that is renamed
// over key once complete, so a reader never sees a partial object. Its
// content type, size and ETag go into an extended attribute of the file
// where the file system has them, else into a sidecar under .meta that is
// not synced (lost in a crash, it is rebuilt from the extension on read).
//
// One fsync makes the object durable: the file's, after the rename. On the
// journaling file systems Linux servers use (ext4, XFS, btrfs) a rename
// changes the renamed file's inode in the same journal transaction as the
// folder entries, and fsync of the file commits that transaction (and the
// ones before it, such as the folders made for the key); so the data, the
// attribute and the name are on disk when Put returns. Put used to sync the
// file before the rename and the folder after it: two fsyncs, the second
// about a third of a millisecond on the development machine's disk. Until
// Put returns, the job that stores the object is not succeeded: a crash in
// between leaves it storing, and it is copied again.
func (l *Local) Put(ctx context.Context, key string, r io.Reader, size int64, contentType string) error {
	if _, err := l.path(key); err != nil {
		return err
	}
	contentType = contentTypeFor(key, contentType)
	if err := ctx.Err(); err != nil {
		return err
	}
	src := r
	if size >= 0 {
		src = io.LimitReader(r, size+1)
	}
	h := md5.New()
	var meta []byte
	f, tmpData, attr, err := l.createTemp(ctx, io.TeeReader(src, h), func(n int64) ([]byte, error) {
		if size >= 0 && n != size {
			return nil, fmt.Errorf("reader gave %d bytes, want %d", n, size)
		}
		var err error
		meta, err = json.Marshal(localMeta{ContentType: contentType, Size: n, ETag: strings.ToUpper(hex.EncodeToString(h.Sum(nil)))})
		return meta, err
	})
	if err != nil {
		return fmt.Errorf("local put %s: %w", key, err)
	}
	placed := false
	defer func() {
		_ = f.Close()
		if !placed {
			_ = l.root.Remove(tmpData)
		}
	}()
	tmpMeta := ""
	if !attr {
		if tmpMeta, err = l.writeTemp(ctx, strings.NewReader(string(meta))); err != nil {
			return fmt.Errorf("local put %s: %w", key, err)
		}
		defer func() { _ = l.root.Remove(tmpMeta) }()
	}
	if err := l.place(tmpData, key); err != nil {
		return fmt.Errorf("local put %s: %w", key, err)
	}
	placed = true
	if attr {
		// A sidecar of an earlier write would be ignored (the attribute
		// wins); remove it all the same.
		if err := l.root.Remove(metaName(key)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("local put %s: %w", key, err)
		}
	} else if err := l.place(tmpMeta, metaName(key)); err != nil {
		return fmt.Errorf("local put %s: %w", key, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("local put %s: %w", key, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("local put %s: %w", key, err)
	}
	return nil
}

// createTemp copies r into a new file under .tmp and returns it open (not
// synced) with its name. meta is called with the length and its result
// stored as the file's metadata attribute; attr reports whether the file
// system took it.
func (l *Local) createTemp(ctx context.Context, r io.Reader, meta func(n int64) ([]byte, error)) (f *os.File, name string, attr bool, err error) {
	name = localTmpDir + "/" + rand.Text()
	f, err = l.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, "", false, err
	}
	n, err := io.Copy(f, ctxReader{ctx, r})
	if err == nil {
		var b []byte
		if b, err = meta(n); err == nil {
			if err = setMetaAttr(f, b); err == nil {
				attr = true
			} else if errors.Is(err, errNoXattr) {
				err = nil
			}
		}
	}
	if err != nil {
		_ = f.Close()
		_ = l.root.Remove(name)
		return nil, "", false, err
	}
	return f, name, attr, nil
}

// place renames the temporary file tmp to key, creating key's folders when
// the first try finds them missing. key's parents are checked to be real
// folders first, and key not to be a link or special file.
func (l *Local) place(tmp, key string) error {
	err := l.checkParents(key)
	if errors.Is(err, fs.ErrNotExist) {
		if dir := path.Dir(key); dir != "." {
			if err := l.root.MkdirAll(dir, 0o755); err != nil {
				return err
			}
		}
		err = l.checkParents(key)
	}
	if err != nil {
		return err
	}
	if fi, err := l.root.Lstat(key); err == nil && !fi.Mode().IsRegular() {
		return errNotRegular(fi)
	}
	return l.root.Rename(tmp, key)
}

// writeTemp copies r into a new file under .tmp (not synced) and returns
// its name.
func (l *Local) writeTemp(ctx context.Context, r io.Reader) (name string, err error) {
	name = localTmpDir + "/" + rand.Text()
	f, err := l.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return "", err
	}
	_, err = io.Copy(f, ctxReader{ctx, r})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = l.root.Remove(name)
		return "", err
	}
	return name, nil
}

// errNoXattr: the file system keeps no extended attributes.
var errNoXattr = errors.New("no extended attributes")

// checkParents verifies every directory on key's path is a real directory,
// not a symbolic link. A missing one gives fs.ErrNotExist.
func (l *Local) checkParents(key string) error {
	for i := 0; i < len(key); i++ {
		if key[i] != '/' {
			continue
		}
		fi, err := l.root.Lstat(key[:i])
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			return fmt.Errorf("%s: %w", key[:i], errNotRegular(fi))
		}
	}
	return nil
}

// errNotRegular explains why a path that should be a plain file or directory
// is refused; a symbolic link gives an error matching schema.ErrForbidden.
func errNotRegular(fi fs.FileInfo) error {
	if fi.Mode()&fs.ModeSymlink != 0 {
		return fmt.Errorf("%w: symbolic link refused", schema.ErrForbidden)
	}
	if fi.IsDir() {
		return errors.New("is a directory")
	}
	if fi.Mode().IsRegular() {
		return errIsFile
	}
	return fmt.Errorf("%w: special file (%s) refused", schema.ErrForbidden, fi.Mode().Type())
}

// lstatObject finds key's file, refusing links and special files; a missing
// object (or a directory) gives schema.ErrNotFound.
func (l *Local) lstatObject(key string) (fs.FileInfo, error) {
	if err := l.checkParents(key); err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, errIsFile) {
			return nil, fmt.Errorf("%w: %s", schema.ErrNotFound, key)
		}
		return nil, err
	}
	fi, err := l.root.Lstat(key)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%w: %s", schema.ErrNotFound, key)
	case err != nil:
		return nil, err
	case fi.IsDir():
		return nil, fmt.Errorf("%w: %s", schema.ErrNotFound, key)
	case !fi.Mode().IsRegular():
		return nil, fmt.Errorf("%s: %w", key, errNotRegular(fi))
	}
	return fi, nil
}

var errIsFile = errors.New("is a file")

// Open opens the object's file for serving (the /files/{key} route). The
// caller closes it.
func (l *Local) Open(key string) (*os.File, ObjectInfo, error) {
	if _, err := l.path(key); err != nil {
		return nil, ObjectInfo{}, err
	}
	fi, err := l.lstatObject(key)
	if err != nil {
		return nil, ObjectInfo{}, err
	}
	f, err := l.root.Open(key)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ObjectInfo{}, fmt.Errorf("%w: %s", schema.ErrNotFound, key)
	} else if err != nil {
		return nil, ObjectInfo{}, fmt.Errorf("local open %s: %w", key, err)
	}
	st, err := f.Stat()
	if err != nil || !os.SameFile(fi, st) {
		_ = f.Close()
		return nil, ObjectInfo{}, fmt.Errorf("local open %s: file changed while opening", key)
	}
	info := ObjectInfo{Size: st.Size(), ContentType: contentTypeFor(key, "")}
	b := metaAttr(f)
	if b == nil {
		b, _ = l.root.ReadFile(metaName(key)) // the sidecar, where no attribute is kept
	}
	var m localMeta
	// Metadata whose size disagrees is from another write of this key (a
	// crash or a race between the two renames of a sidecar): ignore it.
	if b != nil && json.Unmarshal(b, &m) == nil && m.Size == st.Size() {
		info.ContentType, info.ETag = contentTypeFor(key, m.ContentType), m.ETag
	}
	return f, info, nil
}

// Get opens the object.
func (l *Local) Get(ctx context.Context, key string) (io.ReadCloser, ObjectInfo, error) {
	if err := ctx.Err(); err != nil {
		return nil, ObjectInfo{}, err
	}
	return l.Open(key)
}

// Delete removes the object and its sidecar; a missing key is not an error.
// Emptied directories are left in place.
func (l *Local) Delete(ctx context.Context, key string) error {
	if _, err := l.path(key); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if _, err := l.lstatObject(key); errors.Is(err, schema.ErrNotFound) {
		return nil
	} else if err != nil {
		return err
	}
	if err := l.root.Remove(key); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("local delete %s: %w", key, err)
	}
	if err := l.root.Remove(metaName(key)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("local delete %s: %w", key, err)
	}
	return nil
}

// URL returns BaseURL + key, signed when SignURLs is set.
func (l *Local) URL(_ context.Context, key string) (string, error) {
	if l.sign {
		return l.SignedURL(key, l.ttl)
	}
	if err := ValidKey(key); err != nil {
		return "", err
	}
	return joinURL(l.base, key), nil
}

// Ping checks that Dir is present and writable.
func (l *Local) Ping(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	name, err := l.writeTemp(ctx, strings.NewReader("ping"))
	if err != nil {
		return fmt.Errorf("local store %s: %w", l.dir, err)
	}
	return l.root.Remove(name)
}

// Signed URL query parameters.
const (
	paramExpires   = "expires"
	paramSignature = "signature"
)

// ErrURLExpired and ErrURLSignature are Verify's refusals; both match
// schema.ErrForbidden, which the server answers with 403.
var (
	ErrURLExpired   error = &urlError{"signed URL has expired"}
	ErrURLSignature error = &urlError{"signed URL signature is missing or wrong"}
)

type urlError struct{ msg string }

func (e *urlError) Error() string        { return e.msg }
func (e *urlError) Is(target error) bool { return target == schema.ErrForbidden }

// SignedURL returns BaseURL + key with an expiry ttl from now and an
// HMAC-SHA256 signature over the key and the expiry.
func (l *Local) SignedURL(key string, ttl time.Duration) (string, error) {
	if err := ValidKey(key); err != nil {
		return "", err
	}
	if len(l.secret) == 0 {
		return "", errors.New("local store: no secret to sign URLs with")
	}
	exp := strconv.FormatInt(l.now().Add(ttl).Unix(), 10)
	q := url.Values{paramExpires: {exp}, paramSignature: {l.mac(key, exp)}}
	return joinURL(l.base, key) + "?" + q.Encode(), nil
}

// Verify checks the query of a signed URL for key (the unescaped key, as the
// route decoded it). It returns nil when URL signing is off, ErrURLSignature
// for a missing or wrong signature (including a changed key or expiry), and
// ErrURLExpired for a genuine but expired link.
func (l *Local) Verify(key string, q url.Values) error {
	if !l.sign {
		return nil
	}
	if err := ValidKey(key); err != nil {
		return ErrURLSignature
	}
	exp, sig := q.Get(paramExpires), q.Get(paramSignature)
	if exp == "" || sig == "" || !hmac.Equal([]byte(sig), []byte(l.mac(key, exp))) {
		return ErrURLSignature
	}
	t, err := strconv.ParseInt(exp, 10, 64)
	if err != nil {
		return ErrURLSignature
	}
	if l.now().Unix() > t {
		return ErrURLExpired
	}
	return nil
}

func (l *Local) mac(key, exp string) string {
	m := hmac.New(sha256.New, l.secret)
	m.Write([]byte(key))
	m.Write([]byte{'\n'})
	m.Write([]byte(exp))
	return hex.EncodeToString(m.Sum(nil))
}

// ctxReader stops a copy when its context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
