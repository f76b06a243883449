package server

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/schema"
)

// expectInvalidField fails t unless r is 400 invalid_request naming field.
func expectInvalidField(t *testing.T, r resp, field string) {
	t.Helper()
	expect(t, r, 400, "invalid_request")
	var e struct {
		Error struct {
			Details map[string]any `json:"details"`
		} `json:"error"`
	}
	if err := json.Unmarshal(r.body, &e); err != nil || e.Error.Details["field"] != field {
		t.Fatalf("error does not name field %q: %s", field, r.body)
	}
}

// TestUserIDLookalikes: /users/bob%20 and the like are refused and leave bob
// as he was; BOB is a user of its own.
func TestUserIDLookalikes(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		user := func(method, id string, body any) resp {
			return b.do(req{method: method, path: "/api/v1/users/" + id, key: styleKey, body: body})
		}
		credit := func(id, key string, delta int) resp {
			return b.do(req{method: "POST", path: "/api/v1/users/" + id + "/credits", key: styleKey,
				body: map[string]any{"delta": delta}, header: map[string]string{"Idempotency-Key": key}})
		}
		expect(t, user("PUT", "bob", `{"nickname":"Bob","email":"bob@example.com"}`), 200)
		expect(t, credit("bob", "pay", 4), 200)
		b.addPhoto("style", "bob", "job-bob", 0)

		for _, id := range []string{"bob%20", "%20bob", "bob%09", "bob%0A", "bob%C2%A0", "bob%E2%80%8B"} {
			t.Run(id, func(t *testing.T) {
				b := b.with(t)
				expectInvalidField(t, user("GET", id, nil), "id")
				expectInvalidField(t, user("PUT", id, `{"nickname":"Impostor"}`), "id")
				expectInvalidField(t, credit(id, "spend", -3), "id")
				expectInvalidField(t, b.do(req{method: "GET", path: "/api/v1/photos?user_id=" + id, key: styleKey}), "user_id")
				expectInvalidField(t, b.do(req{method: "GET", path: "/api/v1/jobs?user_id=" + id, key: styleKey}), "user_id")
			})
		}
		for _, id := range []string{"bob ", " bob", "bob\t", "bob\u00a0"} {
			r := b.do(req{method: "POST", path: "/api/v1/jobs", key: styleKey,
				body: map[string]any{"user_id": id, "workflow": map[string]any{"1": map[string]any{"class_type": "X", "inputs": map[string]any{}}}}})
			expectInvalidField(t, r, "user_id")
		}
		if n := len(b.jobs.calls()); n != 0 {
			t.Errorf("%d refused submissions reached the job service", n)
		}

		// Case matters: BOB is another user.
		expect(t, user("GET", "BOB", nil), 404, "not_found")
		expect(t, user("PUT", "BOB", `{"nickname":"Other"}`), 200)

		r := user("GET", "bob", nil)
		expect(t, r, 200)
		var u schema.User
		b.decode(r, &u)
		if u.ExternalID != "bob" || u.Nickname != "Bob" || u.Email != "bob@example.com" || u.Credits != 7 || u.PhotoCount != 1 {
			t.Errorf("bob after the lookalikes: %s; want nickname Bob, 7 credits, 1 photo", r.body)
		}
	})
}

// TestNicknameLimit: 64 characters, whatever their width in bytes.
func TestNicknameLimit(t *testing.T) {
	eachDB(t, func(t *testing.T, b *bundle) {
		nick := strings.Repeat("\U0001F600", schema.MaxNicknameRunes)
		body, _ := json.Marshal(map[string]string{"nickname": nick})
		r := b.do(req{method: "PUT", path: "/api/v1/users/emoji", key: styleKey, body: string(body)})
		expect(t, r, 200)
		var u schema.User
		b.decode(r, &u)
		if u.Nickname != nick {
			t.Errorf("nickname came back as %q", u.Nickname)
		}
		body, _ = json.Marshal(map[string]string{"nickname": nick + "\U0001F600"})
		expectInvalidField(t, b.do(req{method: "PUT", path: "/api/v1/users/emoji", key: styleKey, body: string(body)}), "nickname")
	})
}
