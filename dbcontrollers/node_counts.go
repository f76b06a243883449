package dbcontrollers

import (
	"context"
	"fmt"

	"github.com/jmoiron/sqlx"
)

// NodeJobCounts are the finished jobs that ended on one node.
type NodeJobCounts struct {
	Succeeded int64
	Failed    int64
}

// JobCountsByNode counts the succeeded and failed jobs by the node they
// ended on (jobs that never reached a node are left out). It reads the
// whole jobs table: call it once at start, then count as jobs finish.
func (s *Store) JobCountsByNode(ctx context.Context) (map[string]NodeJobCounts, error) {
	var rows []struct {
		Node  string `db:"node"`
		State string `db:"state"`
		N     int64  `db:"n"`
	}
	if err := sqlx.SelectContext(ctx, s.db, &rows,
		"SELECT node, state, COUNT(*) AS n FROM jobs WHERE state IN ('succeeded', 'failed') AND node IS NOT NULL AND node <> '' GROUP BY node, state"); err != nil {
		return nil, fmt.Errorf("count jobs by node: %w", interpretError(err))
	}
	out := map[string]NodeJobCounts{}
	for _, r := range rows {
		c := out[r.Node]
		if r.State == "succeeded" {
			c.Succeeded += r.N
		} else {
			c.Failed += r.N
		}
		out[r.Node] = c
	}
	return out, nil
}
