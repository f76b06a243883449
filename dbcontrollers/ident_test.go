package dbcontrollers_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// lookalikes are ids that print like base, or differ from it in case or
// white space only. Each must be refused or be an id of its own.
func lookalikes(base string) []string {
	return []string{base + " ", strings.ToUpper(base), base + "\t", " " + base, base + "\u00a0", base + "\x00"}
}

func refused(err error) bool {
	var ve *schema.ValidationError
	return errors.As(err, &ve)
}

// testIdentExact: "bob", "bob ", "BOB", "bob\t" ... are distinct users or
// refused, never merged: not in the profile, the credits, the photos or the
// ledger's idempotency keys.
func testIdentExact(t *testing.T, c dbcontrollers.Controller) {
	ctx := testContext(t)
	db := c.DB()
	bob, err := c.UserUpsert(ctx, db, &schema.User{ExternalID: "bob", Nickname: "Bob", Email: "bob@example.com"})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.PhotoInsert(ctx, db, photo("bob", "job-bob", 0, "")); err != nil {
		t.Fatal(err)
	}
	pay, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "bob", Delta: 4, IdempotencyKey: "pay"})
	if err != nil {
		t.Fatal(err)
	}
	wantCredits := pay.Balance
	for i, v := range lookalikes("bob") {
		u, err := c.UserUpsert(ctx, db, &schema.User{ExternalID: v, Nickname: "Impostor"})
		if !refused(err) && (err != nil || u.ID == bob.ID || u.ExternalID != v) {
			t.Errorf("upsert %q = %+v, %v: merged with bob (or failed)", v, u, err)
		}
		g, err := c.UserGet(ctx, db, v)
		if !refused(err) && !errors.Is(err, schema.ErrNotFound) && (err != nil || g.ID == bob.ID || g.ExternalID != v) {
			t.Errorf("get %q = %+v, %v: bob's profile (or failed)", v, g, err)
		}
		e, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: v, Delta: -1, Reason: "spend"})
		if !refused(err) && (err != nil || e.UserID != v) {
			t.Errorf("spend of %q = %+v, %v", v, e, err)
		}
		err = c.PhotoInsert(ctx, db, photo(v, fmt.Sprintf("job-v%d", i), 0, ""))
		if err != nil && !refused(err) {
			t.Errorf("photo of %q: %v", v, err)
		}
		ps, _, err := c.PhotoList(ctx, db, dbcontrollers.PhotoFilter{UserID: v})
		if err != nil && !refused(err) {
			t.Errorf("photos of %q: %v", v, err)
		}
		for _, p := range ps {
			if p.UserID != v {
				t.Errorf("photos of %q list %q's photo %d", v, p.UserID, p.ID)
			}
		}
	}
	for _, k := range lookalikes("pay") {
		e, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "bob", Delta: 1, IdempotencyKey: k})
		switch {
		case refused(err):
		case err != nil:
			t.Errorf("key %q (delta 1 after \"pay\" with delta 4): %v, taken for \"pay\"", k, err)
		case e.ID == pay.ID || e.IdempotencyKey != k:
			t.Errorf("key %q replayed %+v", k, e)
		default:
			wantCredits++
		}
	}
	got, err := c.UserGet(ctx, db, "bob")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != bob.ID || got.Nickname != "Bob" || got.Email != "bob@example.com" || got.Credits != wantCredits || got.PhotoCount != 1 {
		t.Errorf("bob after the lookalikes = %+v; want nickname Bob, %d credits, 1 photo", got, wantCredits)
	}
}

// testNickname: the limit is 64 characters, whatever their width.
func testNickname(t *testing.T, c dbcontrollers.Controller) {
	ctx := testContext(t)
	nick := strings.Repeat("\U0001F600", schema.MaxNicknameRunes) // 4 bytes each
	u, err := c.UserUpsert(ctx, c.DB(), &schema.User{ExternalID: "emoji", Nickname: nick})
	if err != nil {
		t.Fatalf("64 emoji refused: %v", err)
	}
	if got, err := c.UserGet(ctx, c.DB(), "emoji"); err != nil || got.Nickname != nick || u.Nickname != nick {
		t.Errorf("nickname stored as %q, %v", got.Nickname, err)
	}
	var ve *schema.ValidationError
	_, err = c.UserUpsert(ctx, c.DB(), &schema.User{ExternalID: "emoji", Nickname: nick + "\U0001F600"})
	if !errors.As(err, &ve) || ve.Field != "nickname" {
		t.Errorf("65 emoji: %v, want a nickname ValidationError", err)
	}
	if _, err := c.UserUpsert(ctx, c.DB(), &schema.User{ExternalID: "emoji", Nickname: "\xff"}); !errors.As(err, &ve) || ve.Field != "nickname" {
		t.Errorf("malformed UTF-8 nickname: %v", err)
	}
}

// TestStoreIdentifiersExact: job ids, user ids, idempotency keys and node
// names of the control database are compared byte for byte.
func TestStoreIdentifiersExact(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		a := newJob("style", "bob", 0)
		a.IdempotencyKey = "k"
		mustInsert(t, s, a)
		for _, id := range append(lookalikes(a.ID), strings.ToLower(a.ID)) {
			if id == a.ID { // ULIDs are upper case already
				continue
			}
			if j, err := s.JobGet(ctx, id); !errors.Is(err, schema.ErrNotFound) {
				t.Errorf("JobGet(%q) = %+v, %v; want not found", id, j, err)
			}
		}
		for _, k := range lookalikes("k") {
			j := newJob("style", "bob", 0)
			j.IdempotencyKey = k
			if err := s.JobInsert(ctx, j); err != nil && !refused(err) {
				t.Errorf("insert with key %q: %v (taken for \"k\")", k, err)
			}
			got, err := s.JobByIdempotencyKey(ctx, "style", k)
			if err == nil && got.ID == a.ID {
				t.Errorf("key %q found the job of \"k\"", k)
			}
		}
		for _, u := range lookalikes("bob") {
			if err := s.JobInsert(ctx, newJob("style", u, 0)); err != nil && !refused(err) {
				t.Errorf("insert for user %q: %v", u, err)
			}
			list, err := s.JobList(ctx, schema.JobFilter{Frontend: "style", UserID: u})
			if err != nil {
				t.Fatal(err)
			}
			for _, j := range list {
				if j.UserID != u {
					t.Errorf("jobs of %q list %s of %q", u, j.ID, j.UserID)
				}
			}
		}
		if err := s.NodeUpsert(ctx, &schema.Node{Name: "gpu", URL: "http://127.0.0.1:8001"}); err != nil {
			t.Fatal(err)
		}
		for i, n := range lookalikes("gpu") {
			url := fmt.Sprintf("http://127.0.0.1:%d", 9000+i)
			if err := s.NodeUpsert(ctx, &schema.Node{Name: n, URL: url}); err != nil && !refused(err) {
				t.Errorf("upsert node %q: %v", n, err)
			}
			if got, err := s.NodeGet(ctx, n); err == nil && got.URL != url {
				t.Errorf("node %q is %+v", n, got)
			}
		}
		if got, err := s.NodeGet(ctx, "gpu"); err != nil || got.URL != "http://127.0.0.1:8001" {
			t.Errorf("node gpu = %+v, %v; a lookalike overwrote it", got, err)
		}
	})
}

// TestMigrationsMakeIdentifiersExact upgrades databases an older release
// filled: every row stays, the unique keys still hold, and the identifier
// columns compare byte for byte at the database itself.
func TestMigrationsMakeIdentifiersExact(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		control, err := cfg.ControlDatabase()
		if err != nil {
			t.Fatal(err)
		}
		old, err := dbcontrollers.OpenAt(ctx, cfg, control, "control", 2)
		if err != nil {
			t.Fatal(err)
		}
		// The job is written as a release at version 2 wrote it: later
		// migrations add columns the store now writes.
		a := newJob("style", "bob", 0)
		a.ID, a.IdempotencyKey = dbcontrollers.NewJobID(time.Now()), "k"
		if _, err := old.ExecContext(ctx, "INSERT INTO jobs (id, frontend, user_id, state, priority, workflow, "+
			"idempotency_key, created_at, updated_at) VALUES (?, ?, ?, 'queued', 0, ?, ?, ?, ?)", a.ID, a.Frontend,
			a.UserID, string(a.Workflow), a.IdempotencyKey, "2026-01-01 00:00:00.000000", "2026-01-01 00:00:00.000000"); err != nil {
			t.Fatal(err)
		}
		if err := dbcontrollers.NewStore(old).NodeUpsert(ctx, &schema.Node{Name: "gpu", URL: "http://127.0.0.1:8001"}); err != nil {
			t.Fatal(err)
		}
		old.Close()
		fname, err := cfg.FrontendDatabase("style", "")
		if err != nil {
			t.Fatal(err)
		}
		oldF, err := dbcontrollers.OpenAt(ctx, cfg, fname, "frontend", 3)
		if err != nil {
			t.Fatal(err)
		}
		fc := dbcontrollers.FrontendConfig{Name: "style", InitialCredits: 5}
		c, err := dbcontrollers.NewController(oldF, fc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.UserUpsert(ctx, oldF, &schema.User{ExternalID: "bob", Nickname: "Bob"}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.CreditsApply(ctx, oldF, dbcontrollers.CreditParams{UserID: "bob", Delta: 2, IdempotencyKey: "pay"}); err != nil {
			t.Fatal(err)
		}
		if err := c.PhotoInsert(ctx, oldF, photo("bob", "job-1", 0, "")); err != nil {
			t.Fatal(err)
		}
		oldF.Close()

		db, err := dbcontrollers.OpenControl(ctx, cfg)
		if err != nil {
			t.Fatalf("upgrade control: %v", err)
		}
		defer db.Close()
		s := dbcontrollers.NewStore(db)
		if got, err := s.JobByIdempotencyKey(ctx, "style", "k"); err != nil || got.ID != a.ID || got.UserID != "bob" {
			t.Errorf("job after upgrade = %+v, %v", got, err)
		}
		dup := newJob("style", "bob", 0)
		dup.IdempotencyKey = "k"
		if err := s.JobInsert(ctx, dup); !errors.Is(err, schema.ErrConflict) {
			t.Errorf("second job with key k: %v, want ErrConflict", err)
		}
		if n, err := s.NodeGet(ctx, "gpu"); err != nil || n.URL != "http://127.0.0.1:8001" {
			t.Errorf("node after upgrade = %+v, %v", n, err)
		}
		count := func(d *dbcontrollers.DB, q string, args ...any) int {
			t.Helper()
			var n int
			if err := d.GetContext(ctx, &n, q, args...); err != nil {
				t.Fatalf("%s: %v", q, err)
			}
			return n
		}
		for _, q := range []struct {
			sql string
			arg string
		}{
			{"SELECT COUNT(*) FROM jobs WHERE id = ?", a.ID + " "},
			{"SELECT COUNT(*) FROM jobs WHERE user_id = ?", "bob "},
			{"SELECT COUNT(*) FROM jobs WHERE frontend = ?", "style "},
			{"SELECT COUNT(*) FROM jobs WHERE idempotency_key = ?", "k "},
			{"SELECT COUNT(*) FROM nodes WHERE name = ?", "gpu "},
		} {
			if n := count(db, q.sql, q.arg); n != 0 {
				t.Errorf("%s [%q]: %d rows, want 0", q.sql, q.arg, n)
			}
		}

		fdb, err := dbcontrollers.OpenFrontend(ctx, cfg, fname)
		if err != nil {
			t.Fatalf("upgrade frontend: %v", err)
		}
		defer fdb.Close()
		for _, q := range []struct {
			sql string
			arg string
		}{
			{"SELECT COUNT(*) FROM users WHERE external_id = ?", "bob "},
			{"SELECT COUNT(*) FROM credit_ledger WHERE idempotency_key = ?", "pay "},
			{"SELECT COUNT(*) FROM photos WHERE job_id = ?", "job-1 "},
			{"SELECT COUNT(*) FROM photos WHERE node = ?", "gpu-1 "},
		} {
			if n := count(fdb, q.sql, q.arg); n != 0 {
				t.Errorf("%s [%q]: %d rows, want 0", q.sql, q.arg, n)
			}
		}
		// The unique key on users still holds; "bob " is another user.
		insert := "INSERT INTO users (external_id, credits, created_at, updated_at) VALUES (?, 0, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
		if _, err := fdb.ExecContext(ctx, insert, "bob"); err == nil {
			t.Error("a second users row for bob was accepted")
		}
		if _, err := fdb.ExecContext(ctx, insert, "bob "); err != nil {
			t.Errorf("users row for %q: %v (the database still merges it with bob)", "bob ", err)
		}
		c, err = dbcontrollers.NewController(fdb, fc)
		if err != nil {
			t.Fatal(err)
		}
		u, err := c.UserGet(ctx, fdb, "bob")
		if err != nil || u.Nickname != "Bob" || u.Credits != 7 || u.PhotoCount != 1 {
			t.Errorf("bob after upgrade = %+v, %v; want Bob, 7 credits, 1 photo", u, err)
		}
		if e, err := c.CreditsApply(ctx, fdb, dbcontrollers.CreditParams{UserID: "bob", Delta: 2, IdempotencyKey: "pay"}); err != nil || e.Balance != 7 {
			t.Errorf("replay of pay after upgrade = %+v, %v; want the old entry", e, err)
		}
	})
}
