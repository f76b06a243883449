package oss

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

func newLocal(t *testing.T, cfg LocalConfig) *Local {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	l, err := NewLocal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func TestLocalSymlinksRefused(t *testing.T) {
	dir := t.TempDir()
	outside := t.TempDir()
	secret := filepath.Join(outside, "secret.txt")
	if err := os.WriteFile(secret, []byte("top secret"), 0o644); err != nil {
		t.Fatal(err)
	}
	l := newLocal(t, LocalConfig{Dir: dir})
	mustPut(t, l, "in/real.png", []byte("real"), "image/png")

	// A link to a file outside, a link to a file inside, a link to a
	// directory outside and one inside.
	for _, link := range []struct{ name, target string }{
		{"in/evil.png", secret},
		{"in/alias.png", "real.png"},
		{"outdir", outside},
		{"indir", "in"},
	} {
		if err := os.Symlink(link.target, filepath.Join(dir, filepath.FromSlash(link.name))); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	for _, key := range []string{"in/evil.png", "in/alias.png", "outdir/secret.txt", "indir/real.png"} {
		rc, _, err := l.Get(ctx, key)
		if err == nil {
			b, _ := io.ReadAll(rc)
			rc.Close()
			t.Fatalf("get %s through a link gave %q", key, b)
		}
		if !errors.Is(err, schema.ErrForbidden) {
			t.Errorf("get %s: %v, want a refusal", key, err)
		}
	}
	// Writing through a linked directory is refused and nothing lands outside.
	for _, key := range []string{"outdir/new.txt", "indir/new.txt", "outdir/sub/new.txt"} {
		if err := l.Put(ctx, key, strings.NewReader("x"), 1, ""); err == nil {
			t.Errorf("put %s through a link accepted", key)
		}
	}
	entries, err := os.ReadDir(outside)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Fatalf("outside dir now holds %d entries", len(entries))
	}
	// Deleting through a link touches nothing.
	if err := l.Delete(ctx, "outdir/secret.txt"); err == nil {
		t.Error("delete through a link accepted")
	}
	if _, err := os.Stat(secret); err != nil {
		t.Fatalf("outside file gone: %v", err)
	}
}

func TestLocalAtomicPut(t *testing.T) {
	dir := t.TempDir()
	l := newLocal(t, LocalConfig{Dir: dir})
	mustPut(t, l, "a/x.txt", []byte("first"), "text/plain")

	// A reader that fails half way leaves the old object and no temp file.
	failing := io.MultiReader(strings.NewReader("partial"), errReader{errors.New("disk on fire")})
	if err := l.Put(context.Background(), "a/x.txt", failing, -1, ""); err == nil {
		t.Fatal("failing reader accepted")
	}
	if got, info := mustGet(t, l, "a/x.txt"); string(got) != "first" || info.ContentType != "text/plain" {
		t.Fatalf("after failed put: %q %+v", got, info)
	}
	tmp, err := os.ReadDir(filepath.Join(dir, localTmpDir))
	if err != nil {
		t.Fatal(err)
	}
	if len(tmp) != 0 {
		t.Fatalf("%d temp files left", len(tmp))
	}
	// The object is a plain file at Dir/key.
	if b, err := os.ReadFile(filepath.Join(dir, "a", "x.txt")); err != nil || string(b) != "first" {
		t.Fatalf("file: %q %v", b, err)
	}
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

func TestLocalConcurrentPuts(t *testing.T) {
	l := newLocal(t, LocalConfig{})
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			data := bytes.Repeat([]byte{byte('a' + i)}, 1000*(i+1))
			if err := l.Put(context.Background(), "c/same.txt", bytes.NewReader(data), int64(len(data)), fmt.Sprintf("text/x-%d", i)); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	got, info := mustGet(t, l, "c/same.txt")
	i := int(got[0] - 'a')
	if want := bytes.Repeat([]byte{got[0]}, 1000*(i+1)); !bytes.Equal(got, want) {
		t.Fatalf("mixed content: %d bytes", len(got))
	}
	// The sidecar may come from another writer; it is used only if it agrees.
	if info.ContentType != fmt.Sprintf("text/x-%d", i) && info.ContentType != "text/plain; charset=utf-8" {
		t.Fatalf("content type %q for writer %d", info.ContentType, i)
	}
}

func TestLocalStaleSidecarIgnored(t *testing.T) {
	dir := t.TempDir()
	l := newLocal(t, LocalConfig{Dir: dir})
	mustPut(t, l, "s/x.png", []byte("png bytes"), "image/x-custom")
	// The data file replaced behind the store's back: its sidecar no longer fits.
	if err := os.WriteFile(filepath.Join(dir, "s", "x.png"), []byte("other length"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, info := mustGet(t, l, "s/x.png"); info.ContentType != "image/png" || info.ETag != "" {
		t.Fatalf("stale sidecar used: %+v", info)
	}
}

func TestLocalKeyPrefixOfAnother(t *testing.T) {
	l := newLocal(t, LocalConfig{})
	mustPut(t, l, "p/a/b.txt", []byte("b"), "")
	if _, _, err := l.Get(context.Background(), "p/a"); !errors.Is(err, schema.ErrNotFound) {
		t.Fatalf("directory read as object: %v", err)
	}
	if err := l.Put(context.Background(), "p/a", strings.NewReader("x"), 1, ""); err == nil {
		t.Fatal("object over a directory accepted")
	}
	if err := l.Delete(context.Background(), "p/a"); err != nil {
		t.Fatalf("delete of a directory name: %v", err)
	}
	if got, _ := mustGet(t, l, "p/a/b.txt"); string(got) != "b" {
		t.Fatal("object under the directory lost")
	}
	if _, _, err := l.Get(context.Background(), "p/a/b.txt/c"); !errors.Is(err, schema.ErrNotFound) {
		t.Fatalf("key under a file: %v", err)
	}
}

func TestLocalVerify(t *testing.T) {
	now := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	l := newLocal(t, LocalConfig{BaseURL: "http://127.0.0.1:8080/files", SignURLs: true, Secret: []byte("s1"), TTL: time.Minute, NowFunc: func() time.Time { return now }})
	other := newLocal(t, LocalConfig{BaseURL: "http://127.0.0.1:8080/files", SignURLs: true, Secret: []byte("s2"), NowFunc: func() time.Time { return now }})

	u, err := l.URL(context.Background(), "a b/ü.png")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(u, "http://127.0.0.1:8080/files/a%20b/%C3%BC.png?expires=") {
		t.Fatalf("url %s", u)
	}
	pu, err := url.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	q := pu.Query()
	if err := l.Verify("a b/ü.png", q); err != nil {
		t.Fatalf("genuine: %v", err)
	}
	for name, err := range map[string]error{
		"other secret":  other.Verify("a b/ü.png", q),
		"other key":     l.Verify("a b/u.png", q),
		"invalid key":   l.Verify("../ü.png", q),
		"no signature":  l.Verify("a b/ü.png", url.Values{"expires": q["expires"]}),
		"later expiry":  l.Verify("a b/ü.png", url.Values{"expires": {fmt.Sprint(now.Unix() + 3600)}, "signature": q["signature"]}),
		"empty query":   l.Verify("a b/ü.png", nil),
		"bad signature": l.Verify("a b/ü.png", url.Values{"expires": q["expires"], "signature": {strings.Repeat("0", 64)}}),
	} {
		if !errors.Is(err, ErrURLSignature) || !errors.Is(err, schema.ErrForbidden) {
			t.Errorf("%s: %v", name, err)
		}
	}
	now = now.Add(61 * time.Second)
	if err := l.Verify("a b/ü.png", q); !errors.Is(err, ErrURLExpired) || !errors.Is(err, schema.ErrForbidden) {
		t.Fatalf("expired: %v", err)
	}

	unsigned := newLocal(t, LocalConfig{BaseURL: "/files/"})
	if err := unsigned.Verify("x.png", nil); err != nil {
		t.Fatalf("unsigned store: %v", err)
	}
	if u, _ := unsigned.URL(context.Background(), "d/x y.png"); u != "/files/d/x%20y.png" {
		t.Fatalf("unsigned url %s", u)
	}
	if _, err := NewLocal(LocalConfig{Dir: t.TempDir(), SignURLs: true}); err == nil {
		t.Fatal("signed store without secret accepted")
	}
}

func TestLocalPingNotWritable(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root can write a read-only directory")
	}
	dir := t.TempDir()
	l := newLocal(t, LocalConfig{Dir: dir})
	if err := l.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(dir, localTmpDir), 0o500); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Chmod(filepath.Join(dir, localTmpDir), 0o755) })
	if err := l.Ping(context.Background()); err == nil {
		t.Fatal("ping passed on a read-only store")
	}
}

func TestLocalPingRemovedDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "files")
	l := newLocal(t, LocalConfig{Dir: dir})
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := l.Ping(context.Background()); err == nil {
		t.Fatal("ping passed with the directory gone")
	}
}
