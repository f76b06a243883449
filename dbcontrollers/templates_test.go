package dbcontrollers_test

import (
	"encoding/json"
	"errors"
	"sync"
	"testing"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

func newTemplate(frontend, name, text string) *schema.Template {
	return &schema.Template{
		Frontend: frontend, Name: name,
		Workflow: json.RawMessage(`{"1":{"class_type":"CLIPTextEncode","inputs":{"text":"` + text + `"}}}`),
		Inputs:   []schema.TemplateInput{{Name: "prompt", Node: "1", Input: "text", Type: schema.InputString}},
	}
}

// Versions count up per template, never reuse a deleted template's numbers,
// and a job keeps the template it was made from.
func TestTemplateVersions(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		s := openStore(t, cfg)
		ctx := testContext(t)
		for i, text := range []string{"a", "b"} {
			tp := newTemplate("style", "portrait", text)
			if err := s.TemplateInsert(ctx, tp); err != nil {
				t.Fatal(err)
			}
			if tp.Version != i+1 {
				t.Fatalf("version = %d, want %d", tp.Version, i+1)
			}
		}
		if err := s.TemplateInsert(ctx, newTemplate("logo", "portrait", "c")); err != nil {
			t.Fatal(err)
		}
		got, err := s.TemplateGet(ctx, "style", "portrait", 0)
		if err != nil || got.Version != 2 || got.Ref() != "portrait@2" || len(got.Inputs) != 1 || got.Inputs[0].Name != "prompt" {
			t.Fatalf("latest = %+v, %v", got, err)
		}
		if got, err := s.TemplateGet(ctx, "style", "portrait", 1); err != nil || string(got.Workflow) != string(newTemplate("", "", "a").Workflow) {
			t.Fatalf("version 1 = %+v, %v", got, err)
		}
		_, err = s.TemplateGet(ctx, "style", "portrait", 3)
		wantErr(t, err, schema.ErrNotFound)
		// Byte-exact names: PORTRAIT is not a valid name, "portrait " neither.
		var ve *schema.ValidationError
		if _, err = s.TemplateGet(ctx, "style", "portrait ", 0); !errors.As(err, &ve) {
			t.Fatalf("get \"portrait \": %v, want a validation error", err)
		}

		if err := s.TemplateInsert(ctx, newTemplate("style", "landscape", "d")); err != nil {
			t.Fatal(err)
		}
		list, err := s.TemplateList(ctx, "style")
		if err != nil || len(list) != 2 || list[0].Name != "landscape" || list[1].Ref() != "portrait@2" {
			t.Fatalf("list = %+v, %v", list, err)
		}

		if err := s.TemplateDelete(ctx, "style", "portrait"); err != nil {
			t.Fatal(err)
		}
		wantErr(t, s.TemplateDelete(ctx, "style", "portrait"), schema.ErrNotFound)
		_, err = s.TemplateGet(ctx, "style", "portrait", 1)
		wantErr(t, err, schema.ErrNotFound)
		if list, _ := s.TemplateList(ctx, "style"); len(list) != 1 {
			t.Fatalf("list after delete = %+v", list)
		}
		again := newTemplate("style", "portrait", "e")
		if err := s.TemplateInsert(ctx, again); err != nil || again.Version != 3 {
			t.Fatalf("re-created version = %d, %v; want 3", again.Version, err)
		}

		j := newJob("style", "u1", 0)
		j.Template = again.Ref()
		mustInsert(t, s, j)
		back, err := s.JobGet(ctx, j.ID)
		if err != nil || back.Template != "portrait@3" {
			t.Fatalf("job template = %q, %v", back.Template, err)
		}
		raw := mustInsert(t, s, newJob("style", "u1", 0))
		if back, _ := s.JobGet(ctx, raw.ID); back.Template != "" {
			t.Fatalf("raw job template = %q", back.Template)
		}
	})
}

// Concurrent writers of one template each get their own version.
func TestTemplateInsertConcurrent(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		s := openStore(t, cfg)
		ctx := testContext(t)
		const n = 4
		var wg sync.WaitGroup
		versions := make([]int, n)
		errs := make([]error, n)
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tp := newTemplate("style", "busy", "x")
				errs[i] = s.TemplateInsert(ctx, tp)
				versions[i] = tp.Version
			}()
		}
		wg.Wait()
		seen := map[int]bool{}
		for i := range versions {
			if errs[i] != nil {
				t.Fatal(errs[i])
			}
			if seen[versions[i]] || versions[i] < 1 || versions[i] > n {
				t.Fatalf("versions %v", versions)
			}
			seen[versions[i]] = true
		}
	})
}
