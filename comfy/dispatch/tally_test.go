package dispatch

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// A node view's jobs_done and jobs_failed are totals of the jobs table, not
// of this process: they survive a restart (they once read 0 after one).
func TestNodeJobCountsSurviveRestart(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		e := newFarmEnv(t, cfg, []comfytest.Options{sdOptions()}, nil)
		raises := json.RawMessage(`{
 "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
 "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 31, "sigma": 1.0}},
 "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}`)
		for i := range 2 {
			j := e.submit("alpha", "tally", sdGraph(ckptXL, 2, i), 0)
			e.waitState(j.ID, schema.JobSucceeded, 20*time.Second)
		}
		j := e.submit("alpha", "tally", raises, 0)
		e.waitState(j.ID, schema.JobFailed, 20*time.Second)
		// A job refused before it reached a node counts for no node.
		cancelled := e.submit("alpha", "tally", sdGraph(ckptXL, 2, 9), 0)
		if _, err := e.farm.Cancel(t.Context(), "alpha", cancelled.ID); err != nil {
			t.Fatal(err)
		}

		check := func(when string) {
			t.Helper()
			e.eventually(10*time.Second, "counts "+when, func() bool {
				v, ok := e.nodes.Get("n1")
				return ok && v.JobsDone == 2 && v.JobsFailed == 1
			})
		}
		check("before the restart")
		e.stop()
		e.start()
		check("after the restart")
		j = e.submit("alpha", "tally", sdGraph(ckptXL, 2, 3), 0)
		e.waitState(j.ID, schema.JobSucceeded, 20*time.Second)
		e.eventually(10*time.Second, "count of a job after the restart", func() bool {
			v, _ := e.nodes.Get("n1")
			return v.JobsDone == 3 && v.JobsFailed == 1
		})
	})
}
