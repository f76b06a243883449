package dispatch

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"hash/crc32"
	"image"
	"image/color"
	"image/png"
	"io"
	"io/fs"
	"net/http"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/oss/osstest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// job -> object in the (fake, signature-checking) OSS -> photo row -> the
// photo's URL downloads the same bytes; through a storm of 503s that delays
// the job but loses nothing.
func TestFarmOutputsToOSSThroughA503Storm(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		fake := osstest.Start(t, osstest.Options{})
		store, err := oss.NewAliyun(oss.AliyunConfig{
			Endpoint: fake.Endpoint(), Bucket: fake.Bucket(), AccessKeyID: fake.AccessKeyID(),
			AccessKeySecret: fake.AccessKeySecret(), SignURLs: true, URLTTL: time.Hour,
			AuthVersion: "v4", Region: fake.Region(), MaxRetries: 2, RetryBase: 5 * time.Millisecond,
		})
		if err != nil {
			t.Fatal(err)
		}
		e := newFarmEnvWith(t, cfg, []comfytest.Options{sdOptions()}, nil, store, nil)
		ctx := context.Background()
		fake.FailNext(12, http.StatusServiceUnavailable) // four rounds of three tries
		j := e.submit("style", "oss-user", sdGraph(ckptXL, 2, 7), 0)
		done := e.waitState(j.ID, schema.JobSucceeded, 60*time.Second)
		if len(done.Outputs) != 1 {
			t.Fatalf("outputs %+v", done.Outputs)
		}
		out := done.Outputs[0]
		if fails := countStatus(fake.Requests(), "PUT", 503); fails != 12 {
			t.Fatalf("fake OSS refused %d PUTs, want 12", fails)
		}
		obj, ok := fake.Object(out.Key)
		if !ok {
			t.Fatalf("no object %s in OSS", out.Key)
		}
		// The bytes are the node's file.
		hist := e.fakes["n1"].History()
		var nodeBytes []byte
		for _, h := range hist {
			for _, files := range h.Outputs {
				for _, f := range files {
					if b, ok := e.fakes["n1"].ReadFile(f.Type, f.Subfolder, f.Filename); ok {
						nodeBytes = b
					}
				}
			}
		}
		if !bytes.Equal(obj.Data, nodeBytes) || obj.ContentType != "image/png" {
			t.Fatalf("object (%d bytes, %s) differs from the node's file (%d bytes)", len(obj.Data), obj.ContentType, len(nodeBytes))
		}
		if !strings.HasPrefix(out.Key, "style/") || !strings.Contains(out.Key, "/"+j.ID+"/0.png") {
			t.Fatalf("object key %q", out.Key)
		}
		ctrl, _ := e.reg.Get("style")
		photos, total, err := ctrl.PhotoList(ctx, ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "oss-user", Page: 1, Limit: 5})
		if err != nil || total != 1 || photos[0].ObjectKey != out.Key {
			t.Fatalf("photos %+v total %d err %v", photos, total, err)
		}
		u, err := store.URL(ctx, photos[0].ObjectKey)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !bytes.Equal(got, nodeBytes) {
			t.Fatalf("GET photo URL: %d, %d bytes", resp.StatusCode, len(got))
		}
	})
}

func countStatus(reqs []osstest.Request, method string, status int) int {
	n := 0
	for _, r := range reqs {
		if r.Method == method && r.Status == status {
			n++
		}
	}
	return n
}

func testPNG(t testing.TB, w, h int) []byte {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for x := 0; x < w; x++ {
		img.Set(x, x%h, color.RGBA{200, 10, 10, 255})
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// pngHeader is a PNG claiming w x h pixels with no pixel data at all.
func pngHeader(w, h uint32) []byte {
	var b bytes.Buffer
	b.WriteString("\x89PNG\r\n\x1a\n")
	chunk := func(typ string, data []byte) {
		_ = binary.Write(&b, binary.BigEndian, uint32(len(data)))
		b.WriteString(typ)
		b.Write(data)
		_ = binary.Write(&b, binary.BigEndian, crc32.ChecksumIEEE(append([]byte(typ), data...)))
	}
	ihdr := make([]byte, 13)
	binary.BigEndian.PutUint32(ihdr[0:], w)
	binary.BigEndian.PutUint32(ihdr[4:], h)
	ihdr[8], ihdr[9] = 8, 6
	chunk("IHDR", ihdr)
	chunk("IEND", nil)
	return b.Bytes()
}

func inputFile(name string, data []byte) schema.InputFile {
	return schema.InputFile{Filename: name, Size: int64(len(data)), Open: func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}}
}

var loadImageGraph = json.RawMessage(`{
 "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
 "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
 "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}`)

// Input images: checked by their bytes, stored, uploaded to the chosen node
// at dispatch and named in LoadImage; disguised or oversized ones refused
// before anything is kept.
func TestFarmInputImages(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	ctx := context.Background()
	cat := testPNG(t, 40, 30)
	j, err := e.farm.Submit(ctx, schema.SubmitParams{Frontend: "alpha", UserID: "in", Workflow: loadImageGraph,
		Inputs: []schema.InputFile{inputFile("cat.png", cat)}})
	if err != nil {
		t.Fatal(err)
	}
	done := e.waitState(j.ID, schema.JobSucceeded, 30*time.Second)
	if len(done.Inputs) != 1 || done.Inputs[0].Width != 40 || done.Inputs[0].ContentType != "image/png" {
		t.Fatalf("inputs %+v", done.Inputs)
	}
	if len(done.Outputs) != 1 || done.Outputs[0].Width != 40 || done.Outputs[0].Height != 30 {
		t.Fatalf("outputs %+v", done.Outputs)
	}
	got, ok := e.fakes["n1"].ReadFile("input", "comfyfarm", j.ID+"_0.png")
	if !ok || !bytes.Equal(got, cat) {
		t.Fatalf("the node did not receive the input image (found %v)", ok)
	}

	refuse := []struct {
		name string
		file schema.InputFile
		want error
	}{
		{"text named .png", inputFile("cat.png", []byte("this is not an image at all, just text")), schema.ErrUnsupportedMedia},
		{"20000x20000 header", inputFile("cat.png", pngHeader(20000, 20000)), schema.ErrTooLarge},
	}
	for _, c := range refuse {
		_, err := e.farm.Submit(ctx, schema.SubmitParams{Frontend: "alpha", UserID: "in2", Workflow: loadImageGraph,
			Inputs: []schema.InputFile{c.file}})
		if !errors.Is(err, c.want) {
			t.Errorf("%s: err = %v, want %v", c.name, err, c.want)
		}
	}
	jobs, err := e.store.JobList(ctx, schema.JobFilter{Frontend: "alpha", UserID: "in2", Limit: 5})
	if err != nil {
		t.Fatal(err)
	}
	if len(jobs) != 0 {
		t.Fatalf("refused uploads left %d jobs", len(jobs))
	}
	if _, _, err := e.storage.Get(ctx, "alpha/inputs"); !errors.Is(err, schema.ErrNotFound) {
		t.Fatalf("unexpected object: %v", err)
	}
}

// outputSources are the two ways a farm learns a finished prompt's output
// files: a node that ends prompts with execution_success (current) tells
// them in its executed frames; a 2023-era node (no execution_success) is
// asked for the history entry. rewrite is applied to whichever the node's
// proxy should tamper with.
var outputSources = []struct {
	name string
	gen  comfytest.Generation
	via  func(t testing.TB, s *comfytest.Server, rewrite func([]byte) []byte, view func(string)) string
}{
	{"stream", comfytest.GenCurrent, func(t testing.TB, s *comfytest.Server, rw func([]byte) []byte, view func(string)) string {
		return rewritingProxy(t, s, nil, rw, view)
	}},
	{"history", comfytest.GenLegacy, func(t testing.TB, s *comfytest.Server, rw func([]byte) []byte, view func(string)) string {
		return rewritingProxy(t, s, rw, nil, view)
	}},
}

// A node that names "../../etc/passwd" as an output cannot make the farm read
// or write outside its own folders: the job fails, nothing is stored.
func TestFarmRefusesTraversalFilenames(t *testing.T) {
	rewrite := regexp.MustCompile(`"filename": ?"[^"]*"`)
	for _, src := range outputSources {
		t.Run(src.name, func(t *testing.T) {
			o := sdOptions()
			o.Generation = src.gen
			e := newFarmEnvWith(t, dbtest.SQLite(t), []comfytest.Options{o}, nil, nil,
				func(name string, s *comfytest.Server) string {
					return src.via(t, s, func(b []byte) []byte {
						return rewrite.ReplaceAll(b, []byte(`"filename": "../../etc/passwd"`))
					}, nil)
				})
			j := e.submit("alpha", "evil", sdGraph(ckptXL, 1, 1), 0)
			done := e.waitState(j.ID, schema.JobFailed, 30*time.Second)
			if done.Error == nil || done.Error.Code != schema.CodeStorageFailed {
				t.Fatalf("error %+v", done.Error)
			}
			ctrl, _ := e.reg.Get("alpha")
			_, total, err := ctrl.PhotoList(context.Background(), ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "evil", Page: 1, Limit: 5})
			if err != nil {
				t.Fatal(err)
			}
			if total != 0 {
				t.Fatalf("%d photos recorded", total)
			}
		})
	}
}

// A node whose history names its output in subfolder "../.." (end to end,
// through the node's real history answer): the job fails storage_failed,
// the node is never asked for a file outside its folders, and nothing is
// written outside (or inside) the storage root.
func TestFarmRefusesTraversalSubfolder(t *testing.T) {
	rewrite := regexp.MustCompile(`"subfolder": ?"[^"]*"`)
	for _, src := range outputSources {
		t.Run(src.name, func(t *testing.T) {
			var mu sync.Mutex
			var views []string
			o := sdOptions()
			o.Generation = src.gen
			e := newFarmEnvWith(t, dbtest.SQLite(t), []comfytest.Options{o}, nil, nil,
				func(name string, s *comfytest.Server) string {
					return src.via(t, s, func(b []byte) []byte {
						return rewrite.ReplaceAll(b, []byte(`"subfolder": "../.."`))
					}, func(q string) {
						mu.Lock()
						views = append(views, q)
						mu.Unlock()
					})
				})
			ctx := context.Background()
			outside := filepath.Dir(e.localDir)
			before := listFiles(t, outside)
			j := e.submit("alpha", "evil-dir", sdGraph(ckptXL, 1, 1), 0)
			done := e.waitState(j.ID, schema.JobFailed, 30*time.Second)
			if done.Error == nil || done.Error.Code != schema.CodeStorageFailed || !strings.Contains(done.Error.Message, "unsafe") {
				t.Fatalf("error %+v", done.Error)
			}
			mu.Lock()
			for _, q := range views {
				if strings.Contains(q, "..") || strings.Contains(q, "%2E%2E") {
					t.Errorf("the node was asked for /view?%s", q)
				}
			}
			mu.Unlock()
			if after := listFiles(t, outside); !slices.Equal(before, after) {
				t.Errorf("files next to the storage root changed: %v -> %v", before, after)
			}
			if files := listFiles(t, e.localDir); len(files) != 0 {
				t.Errorf("storage holds %v", files)
			}
			ctrl, _ := e.reg.Get("alpha")
			_, total, err := ctrl.PhotoList(ctx, ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "evil-dir", Page: 1, Limit: 5})
			if err != nil {
				t.Fatal(err)
			}
			if total != 0 {
				t.Fatalf("%d photos recorded", total)
			}
		})
	}
}

// listFiles lists the regular files under dir, sorted.
func listFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

// Completing a job again (a retried completion, or adoption after a crash
// between the photo rows and the job update) stores no second object and
// adds no second photo row.
func TestFarmRepeatedCompletionIsIdempotent(t *testing.T) {
	e := newFarmEnv(t, dbtest.SQLite(t), []comfytest.Options{sdOptions()}, nil)
	ctx := context.Background()
	j := e.submit("alpha", "idem", sdGraph(ckptXL, 1, 1), 0)
	done := e.waitState(j.ID, schema.JobSucceeded, 30*time.Second)
	r := e.farm.runner(done.Node)
	entry, err := r.client.History(ctx, done.PromptID)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		again, err := e.farm.copyOutputs(ctx, r, done, entry)
		if err != nil {
			t.Fatal(err)
		}
		if len(again) != len(done.Outputs) || again[0].PhotoID != done.Outputs[0].PhotoID || again[0].Key != done.Outputs[0].Key || again[0].SHA256 != done.Outputs[0].SHA256 {
			t.Fatalf("repeat %d gave %+v, first time %+v", i, again, done.Outputs)
		}
	}
	ctrl, _ := e.reg.Get("alpha")
	_, total, err := ctrl.PhotoList(ctx, ctrl.DB(), dbcontrollers.PhotoFilter{UserID: "idem", Page: 1, Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	if total != 1 {
		t.Fatalf("%d photo rows after repeated completions, want 1", total)
	}
	if objects := len(listFiles(t, filepath.Join(e.localDir, "alpha"))); objects != 1 {
		t.Fatalf("%d objects stored, want 1", objects)
	}
}
