package dbcontrollers_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// openController builds one frontend of the given controller through the
// registry, as the service does.
func openController(t *testing.T, cfg dbcontrollers.Config, fc dbcontrollers.FrontendConfig) dbcontrollers.Controller {
	t.Helper()
	reg, err := dbcontrollers.NewRegistry(testContext(t), cfg, []dbcontrollers.FrontendConfig{fc})
	if err != nil {
		t.Fatalf("registry: %v", err)
	}
	t.Cleanup(func() { reg.Close() })
	c, err := reg.Get(fc.Name)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func photo(user, job string, idx int, meta string) *schema.Photo {
	p := &schema.Photo{
		UserID: user, JobID: job, OutputIndex: idx, ObjectKey: fmt.Sprintf("f/%s/%d.png", job, idx),
		ContentType: "image/png", Width: 512, Height: 512, Bytes: 1234, SHA256: "00ff", Node: "gpu-1",
	}
	if meta != "" {
		p.Metadata = json.RawMessage(meta)
	}
	return p
}

// TestControllerConformance runs the same suite against every registered
// controller on every database.
func TestControllerConformance(t *testing.T) {
	t.Parallel()
	for _, ctrl := range dbcontrollers.ControllerNames() {
		t.Run(ctrl, func(t *testing.T) {
			t.Parallel()
			dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
				t.Parallel()
				fc := dbcontrollers.FrontendConfig{Name: "f_" + ctrl, Controller: ctrl, InitialCredits: 5, CostPerJob: 1}
				c := openController(t, cfg, fc)
				if c.Name() != fc.Name || c.InitialCredits() != 5 || c.CostPerJob() != 1 || c.DB() == nil {
					t.Fatalf("config not applied: %s %d %d", c.Name(), c.InitialCredits(), c.CostPerJob())
				}
				t.Run("users", func(t *testing.T) { testUsers(t, c) })
				t.Run("credits", func(t *testing.T) { testCredits(t, c) })
				t.Run("credits_tx", func(t *testing.T) { testCreditsInTx(t, c) })
				t.Run("credits_concurrent", func(t *testing.T) { testCreditsConcurrent(t, c) })
				t.Run("photos", func(t *testing.T) { testPhotos(t, c) })
				t.Run("photo_idempotent", func(t *testing.T) { testPhotoIdempotent(t, c) })
				t.Run("photo_delete", func(t *testing.T) { testPhotoDelete(t, c) })
				t.Run("ident_exact", func(t *testing.T) { testIdentExact(t, c) })
				t.Run("nickname", func(t *testing.T) { testNickname(t, c) })
				t.Run("accept", func(t *testing.T) {
					if err := c.AcceptOutput("image/png"); err != nil {
						t.Errorf("image/png refused: %v", err)
					}
					for _, bad := range []string{"text/html", "application/octet-stream", "", "png"} {
						if err := c.AcceptOutput(bad); !errors.Is(err, schema.ErrUnsupportedMedia) {
							t.Errorf("%q: %v, want ErrUnsupportedMedia", bad, err)
						}
					}
				})
			})
		})
	}
}

func testUsers(t *testing.T, c dbcontrollers.Controller) {
	ctx := testContext(t)
	db := c.DB()
	_, err := c.UserGet(ctx, db, "nobody")
	wantErr(t, err, schema.ErrNotFound)

	u, err := c.UserEnsure(ctx, db, "u-1")
	if err != nil {
		t.Fatal(err)
	}
	if u.ExternalID != "u-1" || u.Credits != c.InitialCredits() || u.ID == 0 || u.CreatedAt.IsZero() {
		t.Fatalf("ensured user = %+v", u)
	}
	again, err := c.UserEnsure(ctx, db, "u-1")
	if err != nil || again.ID != u.ID || again.Credits != u.Credits {
		t.Fatalf("second ensure = %+v, %v (must not grant again)", again, err)
	}
	up, err := c.UserUpsert(ctx, db, &schema.User{ExternalID: "u-1", Nickname: "Ann", Email: "ann@example.com", AvatarURL: "https://a/b.png"})
	if err != nil {
		t.Fatal(err)
	}
	if up.ID != u.ID || up.Nickname != "Ann" || up.Email != "ann@example.com" || up.AvatarURL != "https://a/b.png" || up.Credits != u.Credits {
		t.Errorf("upsert = %+v", up)
	}
	created, err := c.UserUpsert(ctx, db, &schema.User{ExternalID: "U-1", Nickname: "Other"})
	if err != nil || created.ID == u.ID || created.Credits != c.InitialCredits() {
		t.Errorf("user ids are case-sensitive: %+v, %v", created, err)
	}
	if err := c.PhotoInsert(ctx, db, photo("u-1", "job-u", 0, "")); err != nil {
		t.Fatal(err)
	}
	got, err := c.UserGet(ctx, db, "u-1")
	if err != nil || got.PhotoCount != 1 || got.Nickname != "Ann" {
		t.Errorf("get = %+v, %v", got, err)
	}
	var ve *schema.ValidationError
	if _, err := c.UserEnsure(ctx, db, ""); !errors.As(err, &ve) {
		t.Errorf("empty id: %v", err)
	}
}

func balance(t *testing.T, c dbcontrollers.Controller, user string) int64 {
	t.Helper()
	u, err := c.UserGet(testContext(t), c.DB(), user)
	if err != nil {
		t.Fatal(err)
	}
	return u.Credits
}

func testCredits(t *testing.T, c dbcontrollers.Controller) {
	ctx := testContext(t)
	db := c.DB()
	// A user first seen in a top-up gets the initial grant too.
	e, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "c-1", Delta: 10, Reason: "payment", IdempotencyKey: "pay-1"})
	if err != nil {
		t.Fatal(err)
	}
	start := c.InitialCredits()
	if e.Balance != start+10 || e.Delta != 10 || e.UserID != "c-1" || e.ID == 0 || e.IdempotencyKey != "pay-1" {
		t.Fatalf("entry = %+v", e)
	}
	// Replay: same entry, nothing changes.
	r, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "c-1", Delta: 10, Reason: "payment", IdempotencyKey: "pay-1"})
	if err != nil || r.ID != e.ID || r.Balance != e.Balance {
		t.Fatalf("replay = %+v, %v; want entry %d", r, err, e.ID)
	}
	if b := balance(t, c, "c-1"); b != start+10 {
		t.Fatalf("balance after replay %d, want %d", b, start+10)
	}
	_, err = c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "c-1", Delta: 11, IdempotencyKey: "pay-1"})
	wantErr(t, err, schema.ErrConflict)
	// Spending below zero is refused and changes nothing.
	_, err = c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "c-1", Delta: -(start + 11), Reason: "job"})
	wantErr(t, err, schema.ErrInsufficientCredits)
	if b := balance(t, c, "c-1"); b != start+10 {
		t.Fatalf("balance after refused spend %d, want %d", b, start+10)
	}
	e, err = c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "c-1", Delta: -(start + 10), Reason: "job", IdempotencyKey: "job-1"})
	if err != nil || e.Balance != 0 {
		t.Fatalf("spend all = %+v, %v", e, err)
	}
	// A replayed spend still returns its entry although the balance is 0 now.
	if r, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "c-1", Delta: -(start + 10), IdempotencyKey: "job-1"}); err != nil || r.ID != e.ID {
		t.Fatalf("replayed spend = %+v, %v", r, err)
	}
	// Keys are per user.
	if _, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "c-2", Delta: 1, IdempotencyKey: "pay-1"}); err != nil {
		t.Fatalf("same key, other user: %v", err)
	}
	var ve *schema.ValidationError
	if _, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "c-1", Delta: 0}); !errors.As(err, &ve) {
		t.Errorf("zero delta: %v", err)
	}
	// The ledger holds every change: initial grant, payment, spend.
	type historian interface {
		CreditHistory(ctx context.Context, db sqlx.QueryerContext, userID string, limit int) ([]schema.CreditEntry, error)
	}
	h, ok := c.(historian)
	if !ok {
		t.Fatal("controller has no CreditHistory")
	}
	hist, err := h.CreditHistory(ctx, db, "c-1", 0)
	if err != nil {
		t.Fatal(err)
	}
	var sum int64
	for _, e := range hist {
		sum += e.Delta
	}
	wantEntries := 2
	if start > 0 {
		wantEntries = 3
	}
	if len(hist) != wantEntries || sum != 0 || hist[0].Balance != 0 {
		t.Errorf("ledger = %+v (sum %d), want %d entries summing to 0", hist, sum, wantEntries)
	}
}

func testCreditsInTx(t *testing.T, c dbcontrollers.Controller) {
	ctx := testContext(t)
	db := c.DB()
	if _, err := c.UserEnsure(ctx, db, "tx-1"); err != nil {
		t.Fatal(err)
	}
	before := balance(t, c, "tx-1")
	boom := errors.New("boom")
	err := dbcontrollers.InTx(ctx, db, func(tx *sqlx.Tx) error {
		if _, err := c.CreditsApply(ctx, tx, dbcontrollers.CreditParams{UserID: "tx-1", Delta: 7, IdempotencyKey: "k"}); err != nil {
			return err
		}
		if err := c.PhotoInsert(ctx, tx, photo("tx-1", "job-tx", 0, "")); err != nil {
			return err
		}
		return boom
	})
	wantErr(t, err, boom)
	if b := balance(t, c, "tx-1"); b != before {
		t.Errorf("balance %d after rollback, want %d", b, before)
	}
	if ps, err := c.PhotosByJob(ctx, db, "job-tx"); err != nil || len(ps) != 0 {
		t.Errorf("photos after rollback: %v, %v", ps, err)
	}
	// The key was rolled back with the change: it applies now.
	if e, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "tx-1", Delta: 7, IdempotencyKey: "k"}); err != nil || e.Balance != before+7 {
		t.Errorf("apply after rollback = %+v, %v", e, err)
	}
}

func testCreditsConcurrent(t *testing.T, c dbcontrollers.Controller) {
	ctx := testContext(t)
	db := c.DB()
	const user, topUp, spenders = "cc-1", 10, 20
	if _, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: user, Delta: topUp, IdempotencyKey: "top"}); err != nil {
		t.Fatal(err)
	}
	have := balance(t, c, user)
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok, broke := 0, 0
	start := make(chan struct{})
	for i := 0; i < spenders; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			_, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: user, Delta: -1, Reason: "job", IdempotencyKey: fmt.Sprintf("spend-%d", i)})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
			case errors.Is(err, schema.ErrInsufficientCredits):
				broke++
			default:
				t.Errorf("spend %d: %v", i, err)
			}
		}(i)
	}
	close(start)
	wg.Wait()
	wantOK := min(int(have), spenders)
	if ok != wantOK || broke != spenders-wantOK {
		t.Errorf("%d spends succeeded, %d refused; want %d and %d", ok, broke, wantOK, spenders-wantOK)
	}
	if b := balance(t, c, user); b != have-int64(ok) || b < 0 {
		t.Errorf("balance %d, want %d", b, have-int64(ok))
	}

	// A user first seen by several requests at once is created once, with
	// one initial grant, and every request is applied.
	const firsts = 8
	errs := make(chan error, firsts)
	for i := 0; i < firsts; i++ {
		go func(i int) {
			_, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: "fresh", Delta: 2, IdempotencyKey: fmt.Sprint(i)})
			errs <- err
		}(i)
	}
	for i := 0; i < firsts; i++ {
		if err := <-errs; err != nil {
			t.Errorf("first sight: %v", err)
		}
	}
	if b := balance(t, c, "fresh"); b != c.InitialCredits()+2*firsts {
		t.Errorf("fresh user balance %d, want %d", b, c.InitialCredits()+2*firsts)
	}
	for i := 0; i < firsts; i++ {
		go func() {
			_, err := c.UserEnsure(ctx, db, "fresh-2")
			errs <- err
		}()
	}
	for i := 0; i < firsts; i++ {
		if err := <-errs; err != nil {
			t.Errorf("concurrent ensure: %v", err)
		}
	}
	if b := balance(t, c, "fresh-2"); b != c.InitialCredits() {
		t.Errorf("fresh-2 balance %d, want %d (one grant)", b, c.InitialCredits())
	}

	// The submit pattern: ensure the user, then charge, in one transaction,
	// many at once for one user (existing, and first seen): no deadlock.
	for _, who := range []string{user, "fresh-3"} {
		const submits = 8
		for i := 0; i < submits; i++ {
			go func(i int) {
				errs <- dbcontrollers.InTx(ctx, db, func(tx *sqlx.Tx) error {
					if _, err := c.UserEnsure(ctx, tx, who); err != nil {
						return err
					}
					_, err := c.CreditsApply(ctx, tx, dbcontrollers.CreditParams{UserID: who, Delta: 1, IdempotencyKey: fmt.Sprint("submit-", i)})
					return err
				})
			}(i)
		}
		for i := 0; i < submits; i++ {
			if err := <-errs; err != nil {
				t.Errorf("ensure and charge %s: %v", who, err)
			}
		}
	}
	have += 8

	// Concurrent replays of one key: one change, one entry.
	const replays = 8
	ids := make(chan int64, replays)
	for i := 0; i < replays; i++ {
		go func() {
			e, err := c.CreditsApply(ctx, db, dbcontrollers.CreditParams{UserID: user, Delta: 3, IdempotencyKey: "same"})
			if err != nil {
				t.Errorf("replay: %v", err)
				ids <- 0
				return
			}
			ids <- e.ID
		}()
	}
	seen := map[int64]bool{}
	for i := 0; i < replays; i++ {
		seen[<-ids] = true
	}
	if len(seen) != 1 {
		t.Errorf("replays returned entries %v, want one", seen)
	}
	if b := balance(t, c, user); b != have-int64(ok)+3 {
		t.Errorf("balance after replays %d, want %d", b, have-int64(ok)+3)
	}
}

func testPhotos(t *testing.T, c dbcontrollers.Controller) {
	ctx := testContext(t)
	db := c.DB()
	_, baseline, err := c.PhotoList(ctx, db, dbcontrollers.PhotoFilter{})
	if err != nil {
		t.Fatal(err)
	}
	var ids []int64
	for i := 0; i < 25; i++ {
		p := photo("p-1", fmt.Sprintf("job-%02d", i/2), i%2, `{"seed":1}`)
		if err := c.PhotoInsert(ctx, db, p); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, p.ID)
	}
	for i := 0; i < 3; i++ {
		if err := c.PhotoInsert(ctx, db, photo("p-2", "other", i, "")); err != nil {
			t.Fatal(err)
		}
	}
	var got []int64
	for page := 1; page <= 4; page++ {
		ps, total, err := c.PhotoList(ctx, db, dbcontrollers.PhotoFilter{UserID: "p-1", Page: page, Limit: 10})
		if err != nil {
			t.Fatal(err)
		}
		if total != 25 {
			t.Fatalf("total %d, want 25", total)
		}
		if want := []int{10, 10, 5, 0}[page-1]; len(ps) != want {
			t.Fatalf("page %d has %d photos, want %d", page, len(ps), want)
		}
		for _, p := range ps {
			if p.UserID != "p-1" {
				t.Fatalf("photo of %s in p-1's list", p.UserID)
			}
			got = append(got, p.ID)
		}
	}
	want := append([]int64{}, ids...)
	sort.Slice(want, func(i, j int) bool { return want[i] > want[j] })
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("listed %v, want newest first %v", got, want)
	}
	all, total, err := c.PhotoList(ctx, db, dbcontrollers.PhotoFilter{})
	if err != nil || total != baseline+28 || len(all) != dbcontrollers.DefaultPhotoLimit {
		t.Errorf("unfiltered: %d photos of %d, %v; want %d of %d", len(all), total, err, dbcontrollers.DefaultPhotoLimit, baseline+28)
	}
	none, total, err := c.PhotoList(ctx, db, dbcontrollers.PhotoFilter{UserID: "nobody"})
	if err != nil || total != 0 || len(none) != 0 {
		t.Errorf("unknown user: %v %d %v", none, total, err)
	}
	p, err := c.PhotoGet(ctx, db, ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if p.JobID != "job-00" || p.OutputIndex != 0 || p.ObjectKey != "f/job-00/0.png" || p.ContentType != "image/png" ||
		p.Width != 512 || p.Bytes != 1234 || p.SHA256 != "00ff" || p.Node != "gpu-1" || string(p.Metadata) != `{"seed":1}` || p.CreatedAt.IsZero() {
		t.Errorf("photo = %+v", p)
	}
	byJob, err := c.PhotosByJob(ctx, db, "job-03")
	if err != nil || len(byJob) != 2 || byJob[0].OutputIndex != 0 || byJob[1].OutputIndex != 1 {
		t.Errorf("by job = %+v, %v", byJob, err)
	}
	_, err = c.PhotoGet(ctx, db, 1<<40)
	wantErr(t, err, schema.ErrNotFound)
}

func testPhotoIdempotent(t *testing.T, c dbcontrollers.Controller) {
	ctx := testContext(t)
	db := c.DB()
	first := photo("i-1", "job-i", 0, "")
	if err := c.PhotoInsert(ctx, db, first); err != nil {
		t.Fatal(err)
	}
	// A retried completion, also racing itself: no second row.
	const n = 6
	ids := make(chan int64, n)
	for i := 0; i < n; i++ {
		go func() {
			again := photo("i-1", "job-i", 0, "")
			err := dbcontrollers.InTx(ctx, db, func(tx *sqlx.Tx) error { return c.PhotoInsert(ctx, tx, again) })
			if err != nil {
				t.Errorf("repeat insert: %v", err)
			}
			ids <- again.ID
		}()
	}
	for i := 0; i < n; i++ {
		if id := <-ids; id != first.ID {
			t.Errorf("repeat got id %d, want %d", id, first.ID)
		}
	}
	ps, total, err := c.PhotoList(ctx, db, dbcontrollers.PhotoFilter{UserID: "i-1"})
	if err != nil || total != 1 || len(ps) != 1 {
		t.Errorf("after repeats: %d rows (total %d), %v; want 1", len(ps), total, err)
	}
}

func testPhotoDelete(t *testing.T, c dbcontrollers.Controller) {
	ctx := testContext(t)
	db := c.DB()
	p := photo("d-1", "job-d", 0, "")
	if err := c.PhotoInsert(ctx, db, p); err != nil {
		t.Fatal(err)
	}
	del, err := c.PhotoDelete(ctx, db, p.ID)
	if err != nil {
		t.Fatal(err)
	}
	if del.ID != p.ID || del.ObjectKey != p.ObjectKey || del.UserID != "d-1" {
		t.Errorf("deleted = %+v", del)
	}
	_, err = c.PhotoGet(ctx, db, p.ID)
	wantErr(t, err, schema.ErrNotFound)
	_, err = c.PhotoDelete(ctx, db, p.ID)
	wantErr(t, err, schema.ErrNotFound)
	if u, err := c.UserGet(ctx, db, "d-1"); err != nil || u.PhotoCount != 0 {
		t.Errorf("user after delete = %+v, %v", u, err)
	}
}
