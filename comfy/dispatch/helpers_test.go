package dispatch

import "github.com/comfyfarm/comfyfarm/dbcontrollers"

// activeIDs lists the jobs the runner follows and has not given up on.
func (r *runner) activeIDs() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	ids := make([]string, 0, len(r.jobs))
	for id, a := range r.jobs {
		if a.phase != phaseAbandoned {
			ids = append(ids, id)
		}
	}
	return ids
}

var activeStates = dbcontrollers.ActiveStates

func ptr[T any](v T) *T { return &v }
