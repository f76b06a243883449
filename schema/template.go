package schema

import (
	"encoding/json"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Template is a frontend's named, versioned workflow: an API-format graph
// plus the inputs a job may set in it. Every change is a new version; a
// job records the "name@version" it ran.
type Template struct {
	Frontend  string          `json:"frontend"`
	Name      string          `json:"name"`
	Version   int             `json:"version"`
	Workflow  json.RawMessage `json:"workflow,omitempty"`
	Inputs    []TemplateInput `json:"inputs"`
	CreatedAt time.Time       `json:"created_at"`
}

// Ref is the template's "name@version", as a job records it.
func (t *Template) Ref() string { return t.Name + "@" + strconv.Itoa(t.Version) }

// TemplateInput is one value a job may set: input Input of node Node.
type TemplateInput struct {
	Name     string            `json:"name"`
	Node     string            `json:"node"`
	Input    string            `json:"input"`
	Type     TemplateInputType `json:"type"`
	Default  json.RawMessage   `json:"default,omitempty"`
	Min      *float64          `json:"min,omitempty"`
	Max      *float64          `json:"max,omitempty"`
	Choices  []string          `json:"choices,omitempty"`
	Required bool              `json:"required,omitempty"`
}

// TemplateInputType is the type of a template input's value.
type TemplateInputType string

// Template input types. An image input names a file uploaded with the job
// (multipart field "images"); it can only feed LoadImage's image input.
const (
	InputString TemplateInputType = "string"
	InputInt    TemplateInputType = "int"
	InputFloat  TemplateInputType = "float"
	InputBool   TemplateInputType = "bool"
	InputImage  TemplateInputType = "image"
	InputEnum   TemplateInputType = "enum"
)

// TemplateInputTypes lists every input type.
var TemplateInputTypes = []TemplateInputType{InputString, InputInt, InputFloat, InputBool, InputImage, InputEnum}

// Valid reports whether t is a known input type.
func (t TemplateInputType) Valid() bool {
	for _, v := range TemplateInputTypes {
		if t == v {
			return true
		}
	}
	return false
}

var templateName = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)

// ValidTemplateName reports whether name is a well-formed template name:
// lower-case letters, digits, '_' and '-', 1 to 64 bytes. Such a name is
// safe as a file name.
func ValidTemplateName(name string) bool { return templateName.MatchString(name) }

// ParseTemplateRef splits "name" or "name@version" (version 0: the latest).
func ParseTemplateRef(ref string) (name string, version int, err error) {
	name, v, pinned := strings.Cut(ref, "@")
	if !ValidTemplateName(name) {
		return "", 0, Invalid("template", "%q is not a template name (lower-case letters, digits, _ and -, at most 64)", ref)
	}
	if !pinned {
		return name, 0, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || strconv.Itoa(n) != v {
		return "", 0, Invalid("template", "version in %q must be a positive integer", ref)
	}
	return name, n, nil
}
