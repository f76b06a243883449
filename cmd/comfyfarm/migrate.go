package main

import (
	"context"
	"fmt"
	"maps"
	"slices"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
)

func init() {
	register(command{name: "migrate", summary: "create and migrate the control and frontend databases, then exit", run: cmdMigrate})
}

func cmdMigrate(ctx context.Context, e *env, args []string) error {
	fs := newFlagSet(e, "migrate", "[--config FILE]")
	configPath := fs.String("config", "", "YAML configuration file (default: built-in defaults)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, log, err := loadConfig(e, *configPath)
	if err != nil {
		return err
	}
	dbcfg := cfg.dbConfig(log)
	var names []string
	for _, fe := range slices.Sorted(maps.Keys(cfg.Frontends)) {
		name, err := dbcfg.FrontendDatabase(fe, cfg.Frontends[fe].Database)
		if err != nil {
			return err
		}
		names = append(names, name)
	}
	if err := dbcontrollers.Migrate(ctx, dbcfg, names); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	control, _ := dbcfg.ControlDatabase()
	log.Info("databases are up to date", "driver", cfg.Database.Driver, "control", control, "frontends", names)
	return nil
}
