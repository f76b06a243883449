package dbcontrollers_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

func TestStyleController(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		c := openController(t, cfg, dbcontrollers.FrontendConfig{Name: "style", Controller: "style"})
		db := c.DB()
		metas := []string{
			`{"style":"ink","seed":1}`, `{"style":"oil"}`, `{"style":"ink"}`, `{"style":"ink"}`,
			`{"style":7}`, `{"other":"ink"}`, ``, `["ink"]`, `{"style":"` + strings.Repeat("x", 65) + `"}`,
		}
		for i, m := range metas {
			user := "s-1"
			if i == 3 {
				user = "s-2"
			}
			if err := c.PhotoInsert(ctx, db, photo(user, fmt.Sprintf("job-%d", i), 0, m)); err != nil {
				t.Fatalf("insert %s: %v", m, err)
			}
		}
		ps, total, err := c.PhotoList(ctx, db, dbcontrollers.PhotoFilter{Style: "ink"})
		if err != nil || total != 3 || len(ps) != 3 {
			t.Fatalf("style ink: %d of %d, %v; want 3", len(ps), total, err)
		}
		ps, total, err = c.PhotoList(ctx, db, dbcontrollers.PhotoFilter{UserID: "s-1", Style: "ink"})
		if err != nil || total != 2 || len(ps) != 2 || ps[0].JobID != "job-2" || ps[1].JobID != "job-0" {
			t.Fatalf("s-1 ink: %+v (%d), %v", ps, total, err)
		}
		for _, p := range ps {
			var m map[string]any
			if json.Unmarshal(p.Metadata, &m) != nil || m["style"] != "ink" {
				t.Errorf("photo %d metadata %s", p.ID, p.Metadata)
			}
		}
		for _, lookalike := range []string{"INK", "ink ", "Ink"} {
			if _, total, err := c.PhotoList(ctx, db, dbcontrollers.PhotoFilter{Style: lookalike}); err != nil || total != 0 {
				t.Errorf("style %q: %d photos, %v; want none (styles match byte for byte)", lookalike, total, err)
			}
		}
		if _, total, err := c.PhotoList(ctx, db, dbcontrollers.PhotoFilter{}); err != nil || total != len(metas) {
			t.Errorf("every photo is kept, also with unusable styles: %d of %d, %v", total, len(metas), err)
		}
		var ve *schema.ValidationError
		if _, _, err := c.PhotoList(ctx, db, dbcontrollers.PhotoFilter{Style: strings.Repeat("x", 65)}); !errors.As(err, &ve) {
			t.Errorf("overlong style filter: %v", err)
		}
		mv, ok := c.(dbcontrollers.MetadataValidator)
		if !ok {
			t.Fatal("style controller does not validate metadata")
		}
		for m, valid := range map[string]bool{`{"style":"ink"}`: true, `{}`: true, ``: true, `{"style":null}`: true,
			`{"style":7}`: false, `{"style":""}`: false, `{"style":"` + strings.Repeat("x", 65) + `"}`: false} {
			if err := mv.ValidateMetadata(json.RawMessage(m)); (err == nil) != valid {
				t.Errorf("ValidateMetadata(%s) = %v", m, err)
			}
		}
	})
}

func TestGenericRefusesStyleFilter(t *testing.T) {
	t.Parallel()
	c := openController(t, dbtest.SQLite(t), dbcontrollers.FrontendConfig{Name: "plain"})
	var ve *schema.ValidationError
	if _, _, err := c.PhotoList(testContext(t), c.DB(), dbcontrollers.PhotoFilter{Style: "ink"}); !errors.As(err, &ve) {
		t.Errorf("style filter on generic: %v, want ValidationError", err)
	}
	if _, ok := c.(dbcontrollers.MetadataValidator); ok {
		t.Error("generic controller claims to validate metadata")
	}
}

func TestLogoController(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		c := openController(t, cfg, dbcontrollers.FrontendConfig{Name: "logo", Controller: "logo"})
		if c.InitialCredits() != dbcontrollers.LogoInitialCredits {
			t.Errorf("initial credits %d, want the logo default %d", c.InitialCredits(), dbcontrollers.LogoInitialCredits)
		}
		u, err := c.UserEnsure(ctx, c.DB(), "l-1")
		if err != nil || u.Credits != dbcontrollers.LogoInitialCredits {
			t.Fatalf("new logo user = %+v, %v", u, err)
		}
		for ct, ok := range map[string]bool{
			"image/png": true, "IMAGE/PNG": true, "image/png; charset=binary": true,
			"image/jpeg": false, "image/webp": false, "image/gif": false, "video/mp4": false,
		} {
			if err := c.AcceptOutput(ct); (err == nil) != ok {
				t.Errorf("AcceptOutput(%q) = %v", ct, err)
			} else if err != nil && !errors.Is(err, schema.ErrUnsupportedMedia) {
				t.Errorf("AcceptOutput(%q) = %v, want ErrUnsupportedMedia", ct, err)
			}
		}
	})
	// A configured grant wins over the logo default.
	c := openController(t, dbtest.SQLite(t), dbcontrollers.FrontendConfig{Name: "logo", Controller: "logo", InitialCredits: 2})
	if c.InitialCredits() != 2 {
		t.Errorf("configured initial credits %d, want 2", c.InitialCredits())
	}
	// The generic controller keeps other images and video.
	g := openController(t, dbtest.SQLite(t), dbcontrollers.FrontendConfig{Name: "gen"})
	for _, ct := range []string{"image/jpeg", "image/webp", "video/mp4", "audio/flac"} {
		if err := g.AcceptOutput(ct); err != nil {
			t.Errorf("generic refuses %s: %v", ct, err)
		}
	}
	only := openController(t, dbtest.SQLite(t), dbcontrollers.FrontendConfig{Name: "gen", Options: map[string]string{"accept": "image/webp, video/*"}})
	if only.AcceptOutput("image/webp") != nil || only.AcceptOutput("video/webm") != nil || only.AcceptOutput("image/png") == nil {
		t.Error("accept option not applied")
	}
}

func TestRegistry(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		reg, err := dbcontrollers.NewRegistry(ctx, cfg, []dbcontrollers.FrontendConfig{
			{Name: "style", Controller: "style", InitialCredits: 3, CostPerJob: 1},
			{Name: "logo", Controller: "logo"},
			{Name: "misc"},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer reg.Close()
		if got := strings.Join(reg.Names(), ","); got != "logo,misc,style" {
			t.Errorf("names = %s", got)
		}
		if err := reg.Ping(ctx); err != nil {
			t.Fatal(err)
		}
		for name, want := range map[string]string{"style": "dbcontrollers.Style", "logo": "dbcontrollers.Logo", "misc": "dbcontrollers.Generic"} {
			c, err := reg.Get(name)
			if err != nil {
				t.Fatal(err)
			}
			if got := fmt.Sprintf("%T", c); got != want {
				t.Errorf("%s: controller %s, want %s", name, got, want)
			}
		}
		for _, bad := range []string{"nope", "", "Style", "style; DROP TABLE users", "../x"} {
			if _, err := reg.Get(bad); !errors.Is(err, schema.ErrUnknownFrontend) {
				t.Errorf("Get(%q) = %v, want ErrUnknownFrontend", bad, err)
			}
		}
		// Each frontend has its own database: a user in one is not in another.
		style, _ := reg.Get("style")
		logo, _ := reg.Get("logo")
		if _, err := style.UserEnsure(ctx, style.DB(), "shared"); err != nil {
			t.Fatal(err)
		}
		if _, err := logo.UserGet(ctx, logo.DB(), "shared"); !errors.Is(err, schema.ErrNotFound) {
			t.Errorf("user leaked across frontends: %v", err)
		}
	})
}

func TestRegistryConfigErrors(t *testing.T) {
	t.Parallel()
	cfg := dbtest.SQLite(t)
	for name, tc := range map[string]struct {
		fcs  []dbcontrollers.FrontendConfig
		want string
	}{
		"unknown controller": {[]dbcontrollers.FrontendConfig{{Name: "a", Controller: "fancy"}}, `"fancy"`},
		"bad name":           {[]dbcontrollers.FrontendConfig{{Name: "A-b"}}, `"A-b"`},
		"duplicate":          {[]dbcontrollers.FrontendConfig{{Name: "a"}, {Name: "a"}}, "twice"},
		"shared database":    {[]dbcontrollers.FrontendConfig{{Name: "a", Database: "x"}, {Name: "b", Database: "x"}}, `"x"`},
		"control database":   {[]dbcontrollers.FrontendConfig{{Name: "a", Database: "comfyfarm"}}, "control"},
		"bad database name":  {[]dbcontrollers.FrontendConfig{{Name: "a", Database: "x`; DROP"}}, "must match"},
		"unknown option":     {[]dbcontrollers.FrontendConfig{{Name: "a", Options: map[string]string{"colour": "red"}}}, `"colour"`},
		"logo accept":        {[]dbcontrollers.FrontendConfig{{Name: "a", Controller: "logo", Options: map[string]string{"accept": "image/*"}}}, `"accept"`},
		"bad accept":         {[]dbcontrollers.FrontendConfig{{Name: "a", Options: map[string]string{"accept": "*/*"}}}, "accept"},
		"negative credits":   {[]dbcontrollers.FrontendConfig{{Name: "a", InitialCredits: -1}}, "negative"},
	} {
		reg, err := dbcontrollers.NewRegistry(testContext(t), cfg, tc.fcs)
		if err == nil {
			reg.Close()
			t.Errorf("%s: accepted", name)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %q does not mention %s", name, err, tc.want)
		}
	}
	if _, err := dbcontrollers.OpenControl(testContext(t), dbcontrollers.Config{Driver: "postgres"}); err == nil {
		t.Error("unknown driver accepted")
	}
	if _, err := dbcontrollers.OpenControl(testContext(t), dbcontrollers.Config{Driver: "mysql", DSN: ""}); err == nil {
		t.Error("mysql without DSN accepted")
	}
}

func TestFrontendDatabaseNames(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		cfg                  dbcontrollers.Config
		frontend, configured string
		want                 string
	}{
		{dbcontrollers.Config{Driver: "sqlite"}, "style", "", "style"},
		{dbcontrollers.Config{Driver: "mysql"}, "style", "", "comfyfarm_style"},
		{dbcontrollers.Config{Driver: "mysql", Prefix: "cf_t1"}, "logo", "", "cf_t1_logo"},
		{dbcontrollers.Config{Driver: "mysql"}, "logo", "logos_prod", "logos_prod"},
	} {
		got, err := tc.cfg.FrontendDatabase(tc.frontend, tc.configured)
		if err != nil || got != tc.want {
			t.Errorf("%+v %s %s = %s, %v; want %s", tc.cfg, tc.frontend, tc.configured, got, err, tc.want)
		}
	}
	if _, err := (dbcontrollers.Config{Driver: "mysql"}).FrontendDatabase("style", "Bad`Name"); err == nil {
		t.Error("bad configured name accepted")
	}
	if _, err := (dbcontrollers.Config{Driver: "mysql", Prefix: strings.Repeat("p", 40)}).FrontendDatabase(strings.Repeat("f", 30), ""); err == nil {
		t.Error("over-long database name accepted")
	}
}
