package dispatch

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/comfyfarm/comfyfarm/schema"
)

// updateAttempts bounds how often Update starts over when another update of
// the same node landed between its store write and its registry write.
const updateAttempts = 8

// Update changes a node's max_inflight and tags: validated like Add, written
// through the store, then applied to the registry, and announced as a change
// (its state stays) so that the farm schedules with the new limit. A node
// from the config file takes the file's values again at the next start.
//
// The store write happens outside the registry lock. Two updates of one node
// at once are ordered optimistically: the registry takes an update only if
// the node's settings are still those the update started from; otherwise the
// update starts over from the newer settings, so the store and the registry
// end with the same last write.
func (n *Nodes) Update(ctx context.Context, name string, p schema.NodeUpdate) (schema.NodeView, error) {
	for range updateAttempts {
		n.mu.Lock()
		e, ok := n.entries[name]
		var base schema.Node
		if ok {
			base = e.node
			base.Tags = slices.Clone(base.Tags)
		}
		n.mu.Unlock()
		if !ok {
			return schema.NodeView{}, fmt.Errorf("node %s: %w", name, schema.ErrNotFound)
		}
		want := base
		if p.MaxInflight != nil {
			want.MaxInflight = *p.MaxInflight
			if want.MaxInflight < 1 {
				// normalizeNode takes 0 as "the default"; here it is a mistake.
				return schema.NodeView{}, schema.Invalid("max_inflight", "must be 1..%d", MaxNodeInflight)
			}
		}
		if p.Tags != nil {
			want.Tags = slices.Clone(p.Tags)
		}
		nd, _, err := normalizeNode(want)
		if err != nil {
			return schema.NodeView{}, err
		}
		nd.UpdatedAt = n.cfg.NowFunc().UTC()
		row := nd
		if err := n.store.NodeUpsert(ctx, &row); err != nil {
			return schema.NodeView{}, fmt.Errorf("update node %s: %w", name, err)
		}

		n.mu.Lock()
		e, ok = n.entries[name]
		if !ok {
			n.mu.Unlock()
			// Removed meanwhile: the upsert may have written the row again.
			if err := n.store.NodeDelete(ctx, name); err != nil && !errors.Is(err, schema.ErrNotFound) {
				n.log.Warn("undo update of a removed node", "node", name, "err", err)
			}
			return schema.NodeView{}, fmt.Errorf("node %s: %w", name, schema.ErrNotFound)
		}
		if !sameSettings(e.node, base) {
			n.mu.Unlock()
			continue // another update won the registry: apply ours on top of it
		}
		old := e.state()
		e.node.MaxInflight, e.node.Tags, e.node.UpdatedAt = nd.MaxInflight, nd.Tags, nd.UpdatedAt
		c := n.changeLocked(e, old, false, false)
		v := n.viewLocked(e)
		n.mu.Unlock()
		n.emit(c)
		n.fillRuntime(&v)
		n.log.Info("node updated", "node", name, "max_inflight", nd.MaxInflight, "tags", nd.Tags)
		return v, nil
	}
	return schema.NodeView{}, fmt.Errorf("node %s: %w: updated concurrently too often, try again", name, schema.ErrConflict)
}

// sameSettings compares what Update changes.
func sameSettings(a, b schema.Node) bool {
	return a.URL == b.URL && a.MaxInflight == b.MaxInflight && slices.Equal(a.Tags, b.Tags)
}

// NodeUpdate changes a node's max_inflight and tags; the scheduler runs at
// once, so a raised limit fills the node's new slots.
func (f *Farm) NodeUpdate(ctx context.Context, name string, p schema.NodeUpdate) (*schema.NodeView, error) {
	v, err := f.nodes.Update(ctx, name, p)
	if err != nil {
		return nil, err
	}
	f.kickScheduler()
	return &v, nil
}
