package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync"

	"github.com/comfyfarm/comfyfarm/schema"
)

// upRunners returns the runners of the nodes that are up, by node name.
func (f *Farm) upRunners() []*runner {
	var out []*runner
	for name, r := range f.runnerList() {
		if st, ok := f.nodes.Health(name); ok && st == schema.NodeUp {
			out = append(out, r)
		}
	}
	slices.SortFunc(out, func(a, b *runner) int {
		switch {
		case a.name < b.name:
			return -1
		case a.name > b.name:
			return 1
		}
		return 0
	})
	return out
}

// ObjectInfo is the union of the object_info catalogues of the nodes that
// are up, each class as a node sent it. A class several nodes offer is taken
// from the first of them by name (their combo lists, such as model files,
// may differ). Nodes that do not answer are left out; with no node up, or
// none answering, the error is schema.ErrNoNode.
func (f *Farm) ObjectInfo(ctx context.Context) (map[string]json.RawMessage, error) {
	runners := f.upRunners()
	cats := make([]map[string]json.RawMessage, len(runners))
	var wg sync.WaitGroup
	for i, r := range runners {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cat, err := r.client.ObjectInfoRaw(ctx)
			if err != nil {
				r.log.Warn("object_info", "err", err)
				return
			}
			cats[i] = cat
		}()
	}
	wg.Wait()
	union := map[string]json.RawMessage{}
	answered := false
	for _, cat := range cats {
		if cat == nil {
			continue
		}
		answered = true
		for class, info := range cat {
			if _, ok := union[class]; !ok {
				union[class] = info
			}
		}
	}
	if !answered {
		return nil, errors.Join(schema.ErrNoNode, ctx.Err())
	}
	return union, nil
}

// SystemStats is the /system_stats of the first node (by name) that is up
// and answers; schema.ErrNoNode when none does.
func (f *Farm) SystemStats(ctx context.Context) (json.RawMessage, error) {
	for _, r := range f.upRunners() {
		raw, err := r.client.SystemStatsRaw(ctx)
		if err == nil {
			return raw, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		r.log.Warn("system_stats", "err", err)
	}
	return nil, schema.ErrNoNode
}
