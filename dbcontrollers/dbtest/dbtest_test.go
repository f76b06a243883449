package dbtest

import (
	"testing"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
)

// TestConfigsNamesMySQL: the MySQL case is always there to run as a subtest,
// so an unreachable server leaves a SKIP (or a failure when required), never
// silence.
func TestConfigsNamesMySQL(t *testing.T) {
	var names []string
	for _, n := range Configs() {
		names = append(names, n.Name)
	}
	if len(names) != 2 || names[0] != dbcontrollers.DialectSQLite || names[1] != dbcontrollers.DialectMySQL {
		t.Fatalf("Configs() = %v, want [sqlite mysql]", names)
	}
	cfg := Configs()[0].Config(t)
	if cfg.Driver != dbcontrollers.DialectSQLite || cfg.Path == "" {
		t.Errorf("sqlite config = %+v", cfg)
	}
}
