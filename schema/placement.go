package schema

import (
	"fmt"
	"math"
	"slices"
	"strings"
)

// Requirements narrow the nodes a job may run on: only nodes with every tag
// and at least MinVRAMGB of total device memory qualify.
type Requirements struct {
	Tags      []string `json:"tags,omitempty"`
	MinVRAMGB float64  `json:"min_vram_gb,omitempty"`
}

// IsZero reports whether r asks for nothing.
func (r *Requirements) IsZero() bool {
	return r == nil || (len(r.Tags) == 0 && r.MinVRAMGB == 0)
}

// Limits of requirements.tags, those of a node's tags (a node has at most 32).
const (
	MaxRequirementTags = 32
	MaxNodeTagLen      = 64
)

// Check validates r: tags are node tag names (as nodes carry them), the VRAM
// a number >= 0. It returns r with tags sorted and deduplicated.
func (r *Requirements) Check() (*Requirements, error) {
	if r == nil {
		return nil, nil
	}
	if r.MinVRAMGB < 0 || math.IsNaN(r.MinVRAMGB) || r.MinVRAMGB > 1<<20 {
		return nil, Invalid("requirements.min_vram_gb", "must be a number of GB, at least 0")
	}
	if len(r.Tags) > MaxRequirementTags {
		return nil, Invalid("requirements.tags", "at most %d tags", MaxRequirementTags)
	}
	out := &Requirements{MinVRAMGB: r.MinVRAMGB}
	for _, t := range r.Tags {
		t = strings.TrimSpace(t)
		if t == "" || len(t) > MaxNodeTagLen {
			return nil, Invalid("requirements.tags", "each tag must be 1..%d characters, as node tags are", MaxNodeTagLen)
		}
		if !slices.Contains(out.Tags, t) {
			out.Tags = append(out.Tags, t)
		}
	}
	slices.Sort(out.Tags)
	if out.IsZero() {
		return nil, nil
	}
	return out, nil
}

// String is a short form for logs and messages: "tags sdxl,flux, min_vram_gb 24".
func (r *Requirements) String() string {
	if r.IsZero() {
		return "none"
	}
	var parts []string
	if len(r.Tags) > 0 {
		parts = append(parts, "tags "+strings.Join(r.Tags, ","))
	}
	if r.MinVRAMGB > 0 {
		parts = append(parts, fmt.Sprintf("min_vram_gb %g", r.MinVRAMGB))
	}
	return strings.Join(parts, ", ")
}

// NoNodeError says why no node can run a job; it matches ErrNoNode. Missing
// maps input names to the values no eligible node offers; Classes lists node
// classes no node offers; Requirements is set when no registered node meets
// the job's requirements.
type NoNodeError struct {
	Reason       string
	Missing      map[string][]string
	Classes      []string
	Requirements *Requirements
}

func (e *NoNodeError) Error() string { return ErrNoNode.Error() + ": " + e.Reason }

// Is makes errors.Is(err, ErrNoNode) hold.
func (e *NoNodeError) Is(target error) bool { return target == ErrNoNode }

// Details is the error's details object as the API shows it.
func (e *NoNodeError) Details() map[string]any {
	d := map[string]any{"reason": e.Reason}
	if len(e.Missing) > 0 {
		d["missing"] = e.Missing
	}
	if len(e.Classes) > 0 {
		d["classes"] = e.Classes
	}
	if e.Requirements != nil {
		d["requirements"] = e.Requirements
	}
	return d
}
