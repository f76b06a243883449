package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/comfyfarm/comfyfarm/schema"
)

// maxTemplateFileBytes bounds a template file.
const maxTemplateFileBytes = 16 << 20

// TemplateFilesConfig says where template files are and what they may name.
type TemplateFilesConfig struct {
	Dir           string   // holds <frontend>/<name>.json
	Frontends     []string // configured frontends; other folders are skipped with a warning
	MaxGraphNodes int      // as Config.MaxGraphNodes
	Logger        *slog.Logger
}

// LoadTemplateFiles stores the templates of the files <frontend>/<name>.json
// under cfg.Dir (the body of PUT /api/v1/templates/{name}): a file whose
// template differs from the latest stored version becomes a new version; an
// unchanged one changes nothing. A missing Dir is no error; a file that does
// not hold a valid template is, naming the file. It returns how many new
// versions were stored.
func LoadTemplateFiles(ctx context.Context, store TemplateStore, cfg TemplateFilesConfig) (int, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	dirs, err := os.ReadDir(cfg.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("templates: %w", err)
	}
	added := 0
	for _, d := range dirs {
		if !d.IsDir() {
			continue
		}
		frontend := d.Name()
		if !slices.Contains(cfg.Frontends, frontend) {
			log.Warn("template folder of no configured frontend skipped", "dir", filepath.Join(cfg.Dir, frontend))
			continue
		}
		files, err := os.ReadDir(filepath.Join(cfg.Dir, frontend))
		if err != nil {
			return added, fmt.Errorf("templates: %w", err)
		}
		for _, f := range files {
			if f.IsDir() || !strings.HasSuffix(f.Name(), ".json") {
				continue
			}
			path := filepath.Join(cfg.Dir, frontend, f.Name())
			stored, err := loadTemplateFile(ctx, store, frontend, strings.TrimSuffix(f.Name(), ".json"), path, cfg.MaxGraphNodes)
			if err != nil {
				return added, fmt.Errorf("template file %s: %w", path, err)
			}
			if stored != nil {
				added++
				log.Info("template loaded", "frontend", frontend, "template", stored.Ref(), "file", path)
			}
		}
	}
	return added, nil
}

// loadTemplateFile stores one file's template unless the latest version is
// the same; it returns the new version, or nil.
func loadTemplateFile(ctx context.Context, store TemplateStore, frontend, name, path string, maxNodes int) (*schema.Template, error) {
	if !schema.ValidTemplateName(name) {
		return nil, fmt.Errorf("%q is not a template name (lower-case letters, digits, _ and -, at most 64)", name)
	}
	data, err := readFileLimit(path, maxTemplateFileBytes)
	if err != nil {
		return nil, err
	}
	var b templateBody
	if err := decodeJSONBytes(data, &b); err != nil {
		return nil, err
	}
	wf, err := checkTemplate(&b, maxNodes)
	if err != nil {
		return nil, err
	}
	t := &schema.Template{Frontend: frontend, Name: name, Workflow: wf, Inputs: b.Inputs}
	latest, err := store.TemplateGet(ctx, frontend, name, 0)
	switch {
	case err == nil && sameTemplate(latest, t):
		return nil, nil
	case err != nil && !errors.Is(err, schema.ErrNotFound):
		return nil, err
	}
	if err := store.TemplateInsert(ctx, t); err != nil {
		// Replicas starting together load the same files: the one that
		// lost the race finds the version the other stored.
		if errors.Is(err, schema.ErrConflict) {
			if latest, gerr := store.TemplateGet(ctx, frontend, name, 0); gerr == nil && sameTemplate(latest, t) {
				return nil, nil
			}
		}
		return nil, err
	}
	return t, nil
}

func readFileLimit(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(io.LimitReader(f, limit+1)); err != nil {
		return nil, err
	}
	if int64(buf.Len()) > limit {
		return nil, fmt.Errorf("larger than %d bytes", limit)
	}
	return buf.Bytes(), nil
}

// sameTemplate reports whether two templates have equal workflows and
// inputs, compared as JSON values.
func sameTemplate(a, b *schema.Template) bool {
	ai, err1 := json.Marshal(a.Inputs)
	bi, err2 := json.Marshal(b.Inputs)
	return err1 == nil && err2 == nil && sameJSONValue(a.Workflow, b.Workflow) && sameJSONValue(ai, bi)
}

func sameJSONValue(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xb, _ := json.Marshal(x) // maps marshal with sorted keys
	yb, _ := json.Marshal(y)
	return bytes.Equal(xb, yb)
}
