package server

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/schema"
)

func TestUsers(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		put := func(id, body string) resp {
			return b.do(req{method: "PUT", path: "/api/v1/users/" + id, key: styleKey, body: body})
		}
		get := func(id string) resp {
			return b.do(req{method: "GET", path: "/api/v1/users/" + id, key: styleKey})
		}

		t.Run("create and update", func(t *testing.T) {
			b := b.with(t)
			r := put("u-42", `{"nickname":"Ann","email":"ann@example.com","avatar_url":"https://cdn.example.com/a.png"}`)
			expect(t, r, 200)
			var u schema.User
			b.decode(r, &u)
			if u.ExternalID != "u-42" || u.Nickname != "Ann" || u.Email != "ann@example.com" || u.Credits != 3 || u.PhotoCount != 0 {
				t.Fatalf("created user: %s", r.body)
			}
			for _, field := range []string{`"id":"u-42"`, `"avatar_url"`, `"credits":3`, `"photo_count":0`, `"created_at"`, `"updated_at"`} {
				if !strings.Contains(string(r.body), field) {
					t.Fatalf("user view lacks %s: %s", field, r.body)
				}
			}
			expect(t, put("u-42", `{"nickname":"Anna"}`), 200)
			r = get("u-42")
			expect(t, r, 200)
			b.decode(r, &u)
			if u.Nickname != "Anna" || u.Email != "" || u.Credits != 3 {
				t.Fatalf("updated user: %s", r.body)
			}
		})

		t.Run("photo count", func(t *testing.T) {
			b := b.with(t)
			b.addPhoto("style", "u-photos", "j1", 0)
			b.addPhoto("style", "u-photos", "j1", 1)
			var u schema.User
			r := get("u-photos")
			expect(t, r, 200)
			b.decode(r, &u)
			if u.PhotoCount != 2 {
				t.Fatalf("photo_count %d, want 2", u.PhotoCount)
			}
		})

		t.Run("unknown user", func(t *testing.T) {
			expect(t, get("nobody"), 404, "not_found")
		})

		t.Run("percent-encoded id", func(t *testing.T) {
			b := b.with(t)
			expect(t, put("user%20one", `{}`), 200)
			c := b.controller("style")
			if _, err := c.UserGet(context.Background(), c.DB(), "user one"); err != nil {
				t.Fatalf("user stored under another id: %v", err)
			}
		})

		t.Run("bad input changes nothing", func(t *testing.T) {
			b := b.with(t)
			cases := []struct {
				name, id, body string
				header         map[string]string
				want           int
				code           string
			}{
				{"malformed json", "bad1", `{"nickname":`, nil, 400, "invalid_json"},
				{"not an object", "bad2", `["x"]`, nil, 400, "invalid_json"},
				{"trailing data", "bad3", `{} {}`, nil, 400, "invalid_json"},
				{"empty body", "bad4", ``, nil, 400, "invalid_json"},
				{"unknown field", "bad5", `{"credits":1000}`, nil, 400, "invalid_request"},
				{"wrong type", "bad6", `{"nickname":5}`, nil, 400, "invalid_request"},
				{"bad email", "bad7", `{"email":"not an email"}`, nil, 400, "invalid_request"},
				{"bad avatar", "bad8", `{"avatar_url":"javascript:alert(1)"}`, nil, 400, "invalid_request"},
				{"long nickname", "bad9", `{"nickname":"` + strings.Repeat("x", 65) + `"}`, nil, 400, "invalid_request"},
				{"long id", strings.Repeat("x", 129), `{}`, nil, 400, "invalid_request"},
				{"control char in id", "bad%0A", `{}`, nil, 400, "invalid_request"},
				{"text/plain", "bad10", `{}`, map[string]string{"Content-Type": "text/plain"}, 415, "unsupported_media_type"},
				{"gzip body", "bad11", `{}`, map[string]string{"Content-Encoding": "gzip"}, 415, "unsupported_media_type"},
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					b := b.with(t)
					r := b.do(req{method: "PUT", path: "/api/v1/users/" + c.id, key: styleKey, body: c.body, header: c.header})
					expect(t, r, c.want, c.code)
					if strings.Contains(string(r.body), "goroutine") {
						t.Fatalf("stack trace in body: %s", r.body)
					}
				})
			}
			c := b.controller("style")
			for i := 1; i <= 11; i++ {
				id := "bad" + string(rune('0'+i%10))
				if i >= 10 {
					id = "bad1" + string(rune('0'+i-10))
				}
				if _, err := c.UserGet(context.Background(), c.DB(), id); !errors.Is(err, schema.ErrNotFound) {
					t.Fatalf("user %s exists after a refused request (err %v)", id, err)
				}
			}
		})
	})
}

func TestCredits(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		credit := func(id, key, body string) resp {
			h := map[string]string{}
			if key != "" {
				h["Idempotency-Key"] = key
			}
			return b.do(req{method: "POST", path: "/api/v1/users/" + id + "/credits", key: styleKey, body: body, header: h})
		}
		balance := func(id string) int64 {
			t.Helper()
			var u schema.User
			r := b.do(req{method: "GET", path: "/api/v1/users/" + id, key: styleKey})
			expect(t, r, 200)
			b.decode(r, &u)
			return u.Credits
		}
		expect(t, b.do(req{method: "PUT", path: "/api/v1/users/payer", key: styleKey, body: `{}`}), 200)

		expect(t, credit("payer", "", `{"delta":5}`), 400, "missing_idempotency_key")
		expect(t, credit("payer", "has space", `{"delta":5}`), 400, "invalid_request")
		expect(t, credit("payer", "k0", `{"delta":0}`), 400, "invalid_request")
		expect(t, credit("payer", "k0", `{"delta":"5"}`), 400, "invalid_request")
		expect(t, credit("payer", "k0", `{"delta":1e30}`), 400, "invalid_request")
		expect(t, credit("payer", "k0", `{"delta":5`), 400, "invalid_json")
		if got := balance("payer"); got != 3 {
			t.Fatalf("balance %d after refused changes, want 3", got)
		}

		r := credit("payer", "pay-1", `{"delta":5,"reason":"payment 1"}`)
		expect(t, r, 200)
		var first schema.CreditEntry
		b.decode(r, &first)
		if first.Delta != 5 || first.Balance != 8 || first.IdempotencyKey != "pay-1" || first.UserID != "payer" {
			t.Fatalf("entry: %s", r.body)
		}

		// A replay returns the same entry and changes nothing.
		r = credit("payer", "pay-1", `{"delta":5,"reason":"payment 1"}`)
		expect(t, r, 200)
		var replay schema.CreditEntry
		b.decode(r, &replay)
		if replay.ID != first.ID || replay.Balance != 8 {
			t.Fatalf("replay: %s, first %+v", r.body, first)
		}
		if got := balance("payer"); got != 8 {
			t.Fatalf("balance %d after replay, want 8", got)
		}

		// The same key with another delta is a conflict.
		expect(t, credit("payer", "pay-1", `{"delta":50}`), 409, "conflict")

		// Spending beyond the balance is 402 and changes nothing.
		expect(t, credit("payer", "spend-1", `{"delta":-9,"reason":"spend"}`), 402, "insufficient_credits")
		if got := balance("payer"); got != 8 {
			t.Fatalf("balance %d after refused spend, want 8", got)
		}
		expect(t, credit("payer", "spend-2", `{"delta":-8}`), 200)
		if got := balance("payer"); got != 0 {
			t.Fatalf("balance %d, want 0", got)
		}

		// A top-up for a user never seen creates it with the initial credits.
		r = credit("newcomer", "pay-9", `{"delta":2}`)
		expect(t, r, 200)
		if got := balance("newcomer"); got != 5 {
			t.Fatalf("newcomer balance %d, want 3+2", got)
		}
	})
}
