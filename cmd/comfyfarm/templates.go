package main

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/server"
)

// exampleTemplates are the example frontends' templates (style/portrait,
// logo/badge): model-free graphs that run on the fake nodes and on a real
// ComfyUI alike.
//
//go:embed templates/*/*.json
var exampleTemplates embed.FS

// templatesDir is where template files are read from: data_dir/templates.
func (c *Config) templatesDir() string { return filepath.Join(c.DataDir, "templates") }

// installExampleTemplates writes the example templates of the configured
// frontends into a data folder that has no templates folder yet (first
// start); an existing folder is the operator's and is left alone.
func installExampleTemplates(cfg *Config) error {
	dir := cfg.templatesDir()
	if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("templates: %w", err)
	}
	return fs.WalkDir(exampleTemplates, "templates", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		frontend := path.Base(path.Dir(p))
		if _, ok := cfg.Frontends[frontend]; !ok {
			return nil
		}
		data, err := exampleTemplates.ReadFile(p)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Join(dir, frontend), 0o755); err != nil {
			return fmt.Errorf("templates: %w", err)
		}
		return os.WriteFile(filepath.Join(dir, frontend, path.Base(p)), data, 0o644)
	})
}

// loadTemplates installs the examples on first start and stores the
// template files' new versions.
func (a *app) loadTemplates(ctx context.Context) error {
	if err := installExampleTemplates(a.cfg); err != nil {
		return err
	}
	_, err := server.LoadTemplateFiles(ctx, dbcontrollers.NewStore(a.control), server.TemplateFilesConfig{
		Dir:           a.cfg.templatesDir(),
		Frontends:     slices.Sorted(maps.Keys(a.cfg.Frontends)),
		MaxGraphNodes: a.cfg.Limits.MaxGraphNodes,
		Logger:        a.log.With("component", "templates"),
	})
	return err
}
