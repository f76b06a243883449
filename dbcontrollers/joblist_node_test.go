package dbcontrollers_test

import (
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// The dashboard lists jobs across frontends and by node.
func TestJobListByNodeAcrossFrontends(t *testing.T) {
	t.Parallel()
	dbtest.Each(t, func(t *testing.T, cfg dbcontrollers.Config) {
		t.Parallel()
		ctx := testContext(t)
		s := openStore(t, cfg)
		a := mustInsert(t, s, newJob("style", "u", 0))
		b := mustInsert(t, s, newJob("logo", "u", 0))
		mustInsert(t, s, newJob("logo", "u", 0))
		for id, node := range map[string]string{a.ID: "gpu-1", b.ID: "gpu-2"} {
			if _, err := s.JobClaim(ctx, dbcontrollers.ClaimParams{ID: id, Node: node, Owner: "o", LeaseUntil: time.Now().Add(time.Minute)}); err != nil {
				t.Fatal(err)
			}
		}
		js, err := s.JobList(ctx, schema.JobFilter{Node: "gpu-2"})
		if err != nil || len(js) != 1 || js[0].ID != b.ID {
			t.Fatalf("node filter: %+v, %v", js, err)
		}
		if js, err := s.JobList(ctx, schema.JobFilter{Frontend: "style", Node: "gpu-2"}); err != nil || len(js) != 0 {
			t.Fatalf("node and frontend: %+v, %v", js, err)
		}
		if js, err := s.JobList(ctx, schema.JobFilter{}); err != nil || len(js) != 3 || js[0].Frontend != "logo" || js[2].ID != a.ID {
			t.Fatalf("every frontend, newest first: %+v, %v", js, err)
		}
	})
}
