package dispatch

import (
	"context"
	"encoding/json"
	"io/fs"
	"path/filepath"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// saveAndPreviewGraph saves one image and previews two more: the node's
// history lists one file of type output and two of type temp.
const saveAndPreviewGraph = `{
 "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 24, "batch_size": 1, "color": 255}},
 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "kept"}},
 "3": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 0}},
 "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
}`

// Only files the workflow saves become photos and stored objects; a frontend
// with keep_temp_outputs keeps the previews too, marked as previews. (A real
// SaveAnimatedWEBP + PreviewImage job once gave five photo rows.)
func TestFarmTempOutputsAreNotPhotos(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		e := newFarmEnv(t, cfg, []comfytest.Options{{}}, nil)
		ctx := context.Background()
		meta := json.RawMessage(`{"album":"x"}`)
		for _, tc := range []struct {
			frontend     string
			wantOutputs  int
			wantPreviews int
		}{
			{"alpha", 1, 0},
			{"keeper", 3, 2},
		} {
			j, err := e.farm.Submit(ctx, schema.SubmitParams{Frontend: tc.frontend, UserID: "u-prev",
				Workflow: json.RawMessage(saveAndPreviewGraph), Metadata: meta})
			if err != nil {
				t.Fatal(err)
			}
			done := e.waitState(j.ID, schema.JobSucceeded, 20*time.Second)
			if len(done.Outputs) != tc.wantOutputs {
				t.Fatalf("%s: %d outputs, want %d: %+v", tc.frontend, len(done.Outputs), tc.wantOutputs, done.Outputs)
			}
			previews := 0
			for _, o := range done.Outputs {
				if o.Preview {
					previews++
				} else if o.Width != 32 || o.Height != 24 {
					t.Errorf("%s: the saved output is %dx%d, want 32x24 (%+v)", tc.frontend, o.Width, o.Height, o)
				}
			}
			if previews != tc.wantPreviews {
				t.Fatalf("%s: %d outputs marked preview, want %d", tc.frontend, previews, tc.wantPreviews)
			}

			ctrl, err := e.reg.Get(tc.frontend)
			if err != nil {
				t.Fatal(err)
			}
			photos, total, err := ctrl.PhotoList(ctx, ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "u-prev", Page: 1, Limit: 10})
			if err != nil {
				t.Fatal(err)
			}
			if total != tc.wantOutputs {
				t.Fatalf("%s: %d photo rows, want %d", tc.frontend, total, tc.wantOutputs)
			}
			marked := 0
			for _, p := range photos {
				var m map[string]any
				if err := json.Unmarshal(p.Metadata, &m); err != nil {
					t.Fatalf("photo metadata %s: %v", p.Metadata, err)
				}
				if m["album"] != "x" {
					t.Errorf("%s: photo %d lost the job's metadata: %s", tc.frontend, p.ID, p.Metadata)
				}
				if m[previewKey] == true {
					marked++
				}
			}
			if marked != tc.wantPreviews {
				t.Fatalf("%s: %d photos marked %s, want %d", tc.frontend, marked, previewKey, tc.wantPreviews)
			}

			objects := 0
			err = filepath.WalkDir(filepath.Join(e.localDir, tc.frontend), func(_ string, d fs.DirEntry, err error) error {
				if err != nil {
					return err
				}
				if !d.IsDir() {
					objects++
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if objects != tc.wantOutputs {
				t.Fatalf("%s: %d objects stored, want %d", tc.frontend, objects, tc.wantOutputs)
			}
		}
	})
}

func TestKeptFiles(t *testing.T) {
	all := []comfy.FileRef{
		{NodeID: "1", Filename: "in.png", Type: "input"},
		{NodeID: "2", Filename: "out.webp", Type: "output"},
		{NodeID: "3", Filename: "prev.png", Type: "temp"},
		{NodeID: "4", Filename: "untyped.png"},
	}
	names := func(fs []comfy.FileRef) (out []string) {
		for _, f := range fs {
			out = append(out, f.Filename)
		}
		return out
	}
	if got := names(keptFiles(all, false)); len(got) != 2 || got[0] != "out.webp" || got[1] != "untyped.png" {
		t.Errorf("default: %q", got)
	}
	if got := names(keptFiles(all, true)); len(got) != 3 || got[1] != "prev.png" {
		t.Errorf("keep temp: %q", got)
	}
}

func TestPreviewMetadata(t *testing.T) {
	for in, want := range map[string]string{
		``:                            `{"comfyfarm_preview":true}`,
		`null`:                        `{"comfyfarm_preview":true}`,
		`{"a":1}`:                     `{"a":1,"comfyfarm_preview":true}`,
		`[1,2]`:                       `{"comfyfarm_preview":true,"metadata":[1,2]}`,
		` "text" `:                    `{"comfyfarm_preview":true,"metadata":"text"}`,
		`{"comfyfarm_preview":false}`: `{"comfyfarm_preview":true}`,
	} {
		if got := string(previewMetadata(json.RawMessage(in))); got != want {
			t.Errorf("previewMetadata(%q) = %s, want %s", in, got, want)
		}
	}
}
