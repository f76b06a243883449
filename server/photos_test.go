package server

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/schema"
)

func TestPhotoList(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		var ids []int64
		for i := range 25 {
			ids = append(ids, b.addPhoto("style", "alice", "ja", i).ID)
		}
		for i := range 3 {
			b.addPhoto("style", "bob", "jb", i)
		}
		list := func(q string) (photoPage, resp) {
			t.Helper()
			r := b.do(req{method: "GET", path: "/api/v1/photos?" + q, key: styleKey})
			var p photoPage
			if r.status == 200 {
				b.decode(r, &p)
			}
			return p, r
		}

		p, r := list("user_id=alice&page=3&limit=10")
		expect(t, r, 200)
		if p.Total != 25 || p.Page != 3 || p.Limit != 10 || len(p.Photos) != 5 {
			t.Fatalf("page 3: total %d page %d limit %d len %d", p.Total, p.Page, p.Limit, len(p.Photos))
		}
		// Newest first: page 3 holds the five oldest.
		for i, ph := range p.Photos {
			if want := ids[4-i]; ph.ID != want {
				t.Fatalf("page 3 photo %d is %d, want %d", i, ph.ID, want)
			}
			if ph.UserID != "alice" || !strings.Contains(ph.URL, "signature=") {
				t.Fatalf("photo view: %+v", ph)
			}
		}
		for _, field := range []string{`"photos"`, `"total":25`, `"page":3`, `"limit":10`, `"job_id"`, `"output_index"`, `"content_type"`, `"sha256"`, `"node"`, `"metadata"`} {
			if !strings.Contains(string(r.body), field) {
				t.Fatalf("list lacks %s: %s", field, r.body)
			}
		}

		p, r = list("user_id=alice")
		expect(t, r, 200)
		if p.Page != 1 || p.Limit != 20 || len(p.Photos) != 20 || p.Photos[0].ID != ids[24] {
			t.Fatalf("defaults: page %d limit %d len %d", p.Page, p.Limit, len(p.Photos))
		}
		p, r = list("user_id=alice&page=9")
		expect(t, r, 200)
		if p.Total != 25 || len(p.Photos) != 0 || string(r.body) == "" || !strings.Contains(string(r.body), `"photos":[]`) {
			t.Fatalf("past the end: %s", r.body)
		}
		p, r = list("")
		expect(t, r, 200)
		if p.Total != 28 {
			t.Fatalf("all users: total %d, want 28", p.Total)
		}
		p, _ = list("user_id=bob")
		if p.Total != 3 {
			t.Fatalf("bob: total %d", p.Total)
		}

		for _, q := range []string{"page=0", "page=-1", "page=x", "limit=0", "limit=101", "limit=1.5", "user_id=" + strings.Repeat("u", 200)} {
			_, r := list(q)
			expect(t, r, 400, "invalid_request")
		}
		// The logo controller does not index styles.
		r = b.do(req{method: "GET", path: "/api/v1/photos?frontend=logo&style=ink", key: adminKey})
		expect(t, r, 400, "invalid_request")
	})
}

func TestPhotoGetDelete(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		ctx := context.Background()
		p := b.addPhoto("style", "alice", "jd", 0)
		other := b.addPhoto("style", "alice", "jd", 1)

		r := b.do(req{method: "GET", path: fmt.Sprintf("/api/v1/photos/%d", p.ID), key: styleKey})
		expect(t, r, 200)
		var got schema.Photo
		b.decode(r, &got)
		if got.ID != p.ID || got.JobID != "jd" || got.ContentType != "image/png" || string(got.Metadata) != `{"k":1}` {
			t.Fatalf("photo view: %s", r.body)
		}
		if strings.Contains(string(r.body), "object_key") {
			t.Fatalf("photo view shows the object key: %s", r.body)
		}

		// The URL serves the object.
		u, err := url.Parse(got.URL)
		if err != nil {
			t.Fatal(err)
		}
		fr := b.do(req{method: "GET", path: u.RequestURI()})
		expect(t, fr, 200)
		if fr.header.Get("Content-Type") != "image/png" || string(fr.body) != string(pngBytes()) {
			t.Fatalf("file: %s %q", fr.header.Get("Content-Type"), fr.body)
		}

		for _, bad := range []string{"0", "-1", "abc", "1.5", "99999999999999999999"} {
			expect(t, b.do(req{method: "GET", path: "/api/v1/photos/" + bad, key: styleKey}), 400, "invalid_request")
			expect(t, b.do(req{method: "DELETE", path: "/api/v1/photos/" + bad, key: styleKey}), 400, "invalid_request")
		}
		expect(t, b.do(req{method: "GET", path: "/api/v1/photos/424242", key: styleKey}), 404, "not_found")

		// Delete removes the row and the stored object, and nothing else.
		r = b.do(req{method: "DELETE", path: fmt.Sprintf("/api/v1/photos/%d", p.ID), key: styleKey})
		expect(t, r, 204)
		expect(t, b.do(req{method: "GET", path: fmt.Sprintf("/api/v1/photos/%d", p.ID), key: styleKey}), 404)
		if _, _, err := b.store.Open(p.ObjectKey); !errors.Is(err, schema.ErrNotFound) {
			t.Fatalf("object still there: %v", err)
		}
		expect(t, b.do(req{method: "GET", path: u.RequestURI()}), 404, "not_found")
		expect(t, b.do(req{method: "DELETE", path: fmt.Sprintf("/api/v1/photos/%d", p.ID), key: styleKey}), 404)
		c := b.controller("style")
		if _, err := c.PhotoGet(ctx, c.DB(), other.ID); err != nil {
			t.Fatalf("other photo: %v", err)
		}
		if _, _, err := b.store.Open(other.ObjectKey); err != nil {
			t.Fatalf("other object: %v", err)
		}
	})
}
