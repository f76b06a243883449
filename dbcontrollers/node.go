package dbcontrollers

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/schema"
)

const nodeColumns = "name, url, tags, max_inflight, drain, source, created_at, updated_at"

type nodeRow struct {
	Name        string `db:"name"`
	URL         string `db:"url"`
	Tags        string `db:"tags"`
	MaxInflight int    `db:"max_inflight"`
	Drain       bool   `db:"drain"`
	Source      string `db:"source"`
	CreatedAt   dbTime `db:"created_at"`
	UpdatedAt   dbTime `db:"updated_at"`
}

func (r *nodeRow) node() (*schema.Node, error) {
	n := &schema.Node{
		Name: r.Name, URL: r.URL, MaxInflight: r.MaxInflight, Drain: r.Drain, Source: r.Source,
		CreatedAt: r.CreatedAt.Time, UpdatedAt: r.UpdatedAt.Time, Tags: []string{},
	}
	if r.Tags != "" {
		if err := json.Unmarshal([]byte(r.Tags), &n.Tags); err != nil {
			return nil, fmt.Errorf("node %s: decode tags: %w", r.Name, err)
		}
	}
	return n, nil
}

// NodeUpsert registers a node or updates its url, tags, max_inflight and
// source. Drain is set only when the node is new: draining is changed with
// NodeSetDrain, so re-registering a node from the config keeps an operator's
// drain. n is filled from the stored row.
func (s *Store) NodeUpsert(ctx context.Context, n *schema.Node) error {
	if err := schema.CheckIdent("name", n.Name, schema.MaxNodeNameBytes); err != nil {
		return err
	}
	switch {
	case n.URL == "" || len(n.URL) > 2048:
		return schema.Invalid("url", "must be 1 to 2048 bytes")
	case n.MaxInflight < 0:
		return schema.Invalid("max_inflight", "must not be negative")
	}
	maxInflight := n.MaxInflight
	if maxInflight == 0 {
		maxInflight = 1
	}
	source := n.Source
	if source == "" {
		source = "api"
	}
	tags := n.Tags
	if tags == nil {
		tags = []string{}
	}
	tagsJSON, err := json.Marshal(tags)
	if err != nil {
		return err
	}
	now := s.now()
	q := "INSERT INTO nodes (" + nodeColumns + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
	if s.mysql() {
		q += "ON DUPLICATE KEY UPDATE url = VALUES(url), tags = VALUES(tags), max_inflight = VALUES(max_inflight), " +
			"source = VALUES(source), updated_at = VALUES(updated_at)"
	} else {
		q += "ON CONFLICT (name) DO UPDATE SET url = excluded.url, tags = excluded.tags, " +
			"max_inflight = excluded.max_inflight, source = excluded.source, updated_at = excluded.updated_at"
	}
	if _, err := s.db.ExecContext(ctx, q, n.Name, n.URL, string(tagsJSON), maxInflight, n.Drain, source,
		tval(now), tval(now)); err != nil {
		return fmt.Errorf("upsert node %s: %w", n.Name, interpretError(err))
	}
	got, err := s.NodeGet(ctx, n.Name)
	if err != nil {
		return err
	}
	*n = *got
	return nil
}

// NodeGet returns one registered node.
func (s *Store) NodeGet(ctx context.Context, name string) (*schema.Node, error) {
	var r nodeRow
	if err := sqlx.GetContext(ctx, s.db, &r, "SELECT "+nodeColumns+" FROM nodes WHERE name = ?", name); err != nil {
		return nil, fmt.Errorf("get node %s: %w", name, interpretError(err))
	}
	return r.node()
}

// NodeList returns every registered node by name.
func (s *Store) NodeList(ctx context.Context) ([]schema.Node, error) {
	var rows []nodeRow
	if err := sqlx.SelectContext(ctx, s.db, &rows, "SELECT "+nodeColumns+" FROM nodes ORDER BY name"); err != nil {
		return nil, fmt.Errorf("list nodes: %w", interpretError(err))
	}
	out := make([]schema.Node, 0, len(rows))
	for i := range rows {
		n, err := rows[i].node()
		if err != nil {
			return nil, err
		}
		out = append(out, *n)
	}
	return out, nil
}

// NodeDelete removes a node; schema.ErrNotFound when there is none. Its jobs
// are the dispatcher's to requeue.
func (s *Store) NodeDelete(ctx context.Context, name string) error {
	res, err := s.db.ExecContext(ctx, "DELETE FROM nodes WHERE name = ?", name)
	if err != nil {
		return fmt.Errorf("delete node %s: %w", name, interpretError(err))
	}
	return oneRow(res, "node "+name)
}

// NodeSetDrain sets or clears a node's drain flag.
func (s *Store) NodeSetDrain(ctx context.Context, name string, drain bool) error {
	res, err := s.db.ExecContext(ctx, "UPDATE nodes SET drain = ?, updated_at = ? WHERE name = ?",
		drain, tval(s.now()), name)
	if err != nil {
		return fmt.Errorf("drain node %s: %w", name, interpretError(err))
	}
	if err := oneRow(res, "node "+name); err != nil && s.mysql() {
		// MySQL counts changed rows: an unchanged flag still needs the node.
		_, err = s.NodeGet(ctx, name)
		return err
	} else if err != nil {
		return err
	}
	return nil
}

type rowsAffected interface{ RowsAffected() (int64, error) }

// oneRow turns "no row matched" into schema.ErrNotFound.
func oneRow(res rowsAffected, what string) error {
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		return fmt.Errorf("%s: %w", what, schema.ErrNotFound)
	}
	return nil
}
