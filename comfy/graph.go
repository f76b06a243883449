package comfy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strings"
)

// Default graph limits.
const (
	DefaultMaxGraphNodes = 5000
	DefaultMaxGraphBytes = 16 << 20
)

// GraphLimits bounds what ParseGraph accepts; zero fields take the defaults.
type GraphLimits struct {
	MaxNodes int
	MaxBytes int
}

// GraphError says which node and input of a workflow is wrong.
type GraphError struct {
	NodeID string
	Field  string
	Reason string
}

func (e *GraphError) Error() string {
	switch {
	case e.NodeID != "" && e.Field != "":
		return fmt.Sprintf("workflow: node %q, %s: %s", e.NodeID, e.Field, e.Reason)
	case e.NodeID != "":
		return fmt.Sprintf("workflow: node %q: %s", e.NodeID, e.Reason)
	}
	return "workflow: " + e.Reason
}

// Graph is an API-format workflow: {"<node id>": {"class_type": ..., "inputs": {...}}}.
// Input values and unknown node fields (such as "_meta") stay raw and survive Marshal.
type Graph struct {
	nodes map[string]*graphNode
	ids   []string // sorted numeric-aware
}

type graphNode struct {
	classType string
	inputs    map[string]json.RawMessage
	extra     map[string]json.RawMessage // every other field of the node
}

// graphLink is an input wired to another node's output: [node_id, output_index].
type graphLink struct {
	from  string
	index int
}

// ParseGraph decodes and checks an API-format workflow: a JSON object of nodes, each with a
// non-empty class_type and an inputs object, links [id, index] pointing at existing nodes
// with a non-negative integer index, no cycles, within the limits. A UI-format ("workflow")
// export is recognised and refused with a hint. Errors are *GraphError.
func ParseGraph(data []byte, lim GraphLimits) (*Graph, error) {
	if lim.MaxNodes <= 0 {
		lim.MaxNodes = DefaultMaxGraphNodes
	}
	if lim.MaxBytes <= 0 {
		lim.MaxBytes = DefaultMaxGraphBytes
	}
	if len(data) > lim.MaxBytes {
		return nil, &GraphError{Reason: fmt.Sprintf("workflow is %d bytes, limit %d", len(data), lim.MaxBytes)}
	}
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return nil, &GraphError{Reason: "workflow must be a JSON object of nodes"}
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(trimmed, &top); err != nil {
		return nil, &GraphError{Reason: "invalid JSON: " + err.Error()}
	}
	if isUIWorkflow(top) {
		return nil, &GraphError{Reason: "this is the UI workflow format (nodes/links); export it with \"Save (API Format)\""}
	}
	if len(top) == 0 {
		return nil, &GraphError{Reason: "workflow has no nodes"}
	}
	if len(top) > lim.MaxNodes {
		return nil, &GraphError{Reason: fmt.Sprintf("workflow has %d nodes, limit %d", len(top), lim.MaxNodes)}
	}
	g := &Graph{nodes: make(map[string]*graphNode, len(top))}
	for id, raw := range top {
		if id == "" {
			return nil, &GraphError{Reason: "empty node id"}
		}
		n, err := parseNode(id, raw)
		if err != nil {
			return nil, err
		}
		g.nodes[id] = n
	}
	g.ids = sortedKeys(g.nodes)
	if err := g.check(); err != nil {
		return nil, err
	}
	return g, nil
}

func isUIWorkflow(top map[string]json.RawMessage) bool {
	for _, k := range []string{"nodes", "links"} {
		if v := bytes.TrimSpace(top[k]); len(v) > 0 && v[0] == '[' {
			return true
		}
	}
	last := bytes.TrimSpace(top["last_node_id"])
	return len(last) > 0 && last[0] >= '0' && last[0] <= '9'
}

func parseNode(id string, raw json.RawMessage) (*graphNode, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '{' {
		return nil, &GraphError{NodeID: id, Reason: "node must be an object"}
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return nil, &GraphError{NodeID: id, Reason: "invalid node: " + err.Error()}
	}
	n := &graphNode{extra: fields}
	ct, ok := fields["class_type"]
	if !ok {
		return nil, &GraphError{NodeID: id, Field: "class_type", Reason: "missing class_type"}
	}
	if err := json.Unmarshal(ct, &n.classType); err != nil {
		return nil, &GraphError{NodeID: id, Field: "class_type", Reason: "class_type must be a string"}
	}
	if strings.TrimSpace(n.classType) == "" {
		return nil, &GraphError{NodeID: id, Field: "class_type", Reason: "empty class_type"}
	}
	delete(fields, "class_type")
	n.inputs = map[string]json.RawMessage{}
	if in, ok := fields["inputs"]; ok {
		in = bytes.TrimSpace(in)
		if len(in) == 0 || in[0] != '{' {
			return nil, &GraphError{NodeID: id, Field: "inputs", Reason: "inputs must be an object"}
		}
		if err := json.Unmarshal(in, &n.inputs); err != nil {
			return nil, &GraphError{NodeID: id, Field: "inputs", Reason: err.Error()}
		}
		delete(fields, "inputs")
	}
	return n, nil
}

// parseLink reports whether v is a link as ComfyUI sees one (a 2-element array whose first
// element is a string) and checks its index.
func parseLink(v json.RawMessage) (graphLink, bool, error) {
	v = bytes.TrimSpace(v)
	if len(v) == 0 || v[0] != '[' {
		return graphLink{}, false, nil
	}
	var arr []json.RawMessage
	if json.Unmarshal(v, &arr) != nil || len(arr) != 2 {
		return graphLink{}, false, nil
	}
	var from string
	if a := bytes.TrimSpace(arr[0]); len(a) == 0 || a[0] != '"' || json.Unmarshal(a, &from) != nil {
		return graphLink{}, false, nil
	}
	var idx float64
	if err := json.Unmarshal(arr[1], &idx); err != nil {
		return graphLink{from: from}, true, fmt.Errorf("link output index must be a number")
	}
	if idx < 0 || idx != math.Trunc(idx) || idx > math.MaxInt32 {
		return graphLink{from: from}, true, fmt.Errorf("link output index %v must be a non-negative integer", idx)
	}
	return graphLink{from: from, index: int(idx)}, true, nil
}

// check validates links and looks for cycles (Kahn's algorithm, no recursion).
func (g *Graph) check() error {
	indeg := make(map[string]int, len(g.nodes))
	users := make(map[string][]string, len(g.nodes))
	for _, id := range g.ids {
		n := g.nodes[id]
		for _, name := range sortedKeys(n.inputs) {
			l, ok, err := parseLink(n.inputs[name])
			if !ok {
				continue
			}
			if err != nil {
				return &GraphError{NodeID: id, Field: "inputs." + name, Reason: err.Error()}
			}
			if _, exists := g.nodes[l.from]; !exists {
				return &GraphError{NodeID: id, Field: "inputs." + name, Reason: fmt.Sprintf("links to node %q, which does not exist", l.from)}
			}
			indeg[id]++
			users[l.from] = append(users[l.from], id)
		}
	}
	queue := make([]string, 0, len(g.nodes))
	for _, id := range g.ids {
		if indeg[id] == 0 {
			queue = append(queue, id)
		}
	}
	seen := 0
	for len(queue) > 0 {
		id := queue[0]
		queue = queue[1:]
		seen++
		for _, u := range users[id] {
			indeg[u]--
			if indeg[u] == 0 {
				queue = append(queue, u)
			}
		}
	}
	if seen != len(g.nodes) {
		for _, id := range g.ids {
			if indeg[id] > 0 {
				return &GraphError{NodeID: id, Reason: "the node is part of a cycle (or depends on one)"}
			}
		}
	}
	return nil
}

// Len is the number of nodes.
func (g *Graph) Len() int { return len(g.nodes) }

// NodeIDs lists node ids, numeric-aware sorted.
func (g *Graph) NodeIDs() []string { return append([]string(nil), g.ids...) }

// ClassType returns a node's class ("" if there is no such node).
func (g *Graph) ClassType(id string) string {
	if n, ok := g.nodes[id]; ok {
		return n.classType
	}
	return ""
}

// ClassTypes lists the distinct node classes, sorted.
func (g *Graph) ClassTypes() []string {
	set := map[string]bool{}
	for _, n := range g.nodes {
		set[n.classType] = true
	}
	return sortedSet(set)
}

// Marshal encodes the graph (nodes and fields in sorted order, unknown fields kept).
func (g *Graph) Marshal() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, id := range g.ids {
		if i > 0 {
			b.WriteByte(',')
		}
		n := g.nodes[id]
		fields := make(map[string]json.RawMessage, len(n.extra)+2)
		for k, v := range n.extra {
			fields[k] = v
		}
		ct, err := json.Marshal(n.classType)
		if err != nil {
			return nil, err
		}
		fields["class_type"] = ct
		in, err := json.Marshal(n.inputs)
		if err != nil {
			return nil, fmt.Errorf("workflow: node %q inputs: %w", id, err)
		}
		fields["inputs"] = in
		key, _ := json.Marshal(id)
		b.Write(key)
		b.WriteByte(':')
		nb, err := json.Marshal(fields)
		if err != nil {
			return nil, fmt.Errorf("workflow: node %q: %w", id, err)
		}
		b.Write(nb)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// stringInput returns a node input that is a JSON string.
func stringInput(raw json.RawMessage) (string, bool) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '"' {
		return "", false
	}
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return "", false
	}
	return s, true
}

func sortedSet(set map[string]bool) []string {
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
