package dbcontrollers_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// TestSQLiteFilesPrivate: the database files (users, e-mail addresses) and
// their -wal and -shm files are the owner's only, also where an older
// release had created them 0644.
func TestSQLiteFilesPrivate(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	cfg := dbtest.SQLite(t)
	// An older release's frontend file, readable by everyone.
	old := filepath.Join(cfg.Path, "style.db")
	if err := os.WriteFile(old, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(old, 0o644); err != nil { // whatever the umask
		t.Fatal(err)
	}
	s := openStore(t, cfg)
	mustInsert(t, s, newJob("style", "u-1", 0))
	c := openController(t, cfg, dbcontrollers.FrontendConfig{Name: "style"})
	if _, err := c.UserUpsert(ctx, c.DB(), &schema.User{ExternalID: "u-1", Email: "u@example.com"}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"comfyfarm.db", "comfyfarm.db-wal", "comfyfarm.db-shm", "style.db", "style.db-wal", "style.db-shm"} {
		fi, err := os.Stat(filepath.Join(cfg.Path, name))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if perm := fi.Mode().Perm(); perm != 0o600 {
			t.Errorf("%s has mode %#o, want 0600", name, perm)
		}
	}
}
