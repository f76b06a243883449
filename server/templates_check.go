package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"net/http"
	"slices"
	"strconv"
	"unicode/utf8"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/schema"
)

// Template bounds.
const (
	maxTemplateInputs   = 64
	maxInputNameBytes   = 64
	maxEnumChoices      = 1000
	maxStringInputBytes = 64 << 10
	maxChoiceBytes      = 1024 // bytes of one enum choice
)

// templateBody is the body of PUT /templates/{name}, and the content of a
// templates/<frontend>/<name>.json file.
type templateBody struct {
	Workflow json.RawMessage        `json:"workflow"`
	Inputs   []schema.TemplateInput `json:"inputs"`
}

// templateNode is what template checks read of a workflow node.
type templateNode struct {
	ClassType string                     `json:"class_type"`
	Inputs    map[string]json.RawMessage `json:"inputs"`
}

// imageInputClasses are the node classes whose "image" input names an
// uploaded file; dispatch rewrites it to the name the file gets on the node.
var imageInputClasses = map[string]bool{"LoadImage": true, "LoadImageMask": true}

// checkTemplate checks a template before it is stored: the workflow is a
// valid API-format graph (the same checks as a submitted one), and every
// declared input names a node and one of its (non-link) inputs, with a type,
// default, range and choices that agree. The workflow comes back compact.
func checkTemplate(b *templateBody, maxNodes int) (json.RawMessage, error) {
	if len(b.Workflow) == 0 || string(b.Workflow) == "null" {
		return nil, schema.Invalid("workflow", "required")
	}
	if _, err := comfy.ParseGraph(b.Workflow, comfy.GraphLimits{MaxNodes: maxNodes}); err != nil {
		var ge *comfy.GraphError
		if errors.As(err, &ge) {
			field := "workflow"
			if ge.NodeID != "" {
				field += "." + ge.NodeID
				if ge.Field != "" {
					field += "." + ge.Field
				}
			}
			return nil, schema.Invalid(field, "%s", ge.Reason)
		}
		return nil, schema.Invalid("workflow", "%v", err)
	}
	var nodes map[string]templateNode
	if err := json.Unmarshal(b.Workflow, &nodes); err != nil {
		return nil, schema.Invalid("workflow", "%v", err)
	}
	if len(b.Inputs) > maxTemplateInputs {
		return nil, schema.Invalid("inputs", "more than %d inputs", maxTemplateInputs)
	}
	names := map[string]bool{}
	targets := map[[2]string]string{}
	for i := range b.Inputs {
		in := &b.Inputs[i]
		field := fmt.Sprintf("inputs[%d]", i)
		if err := checkInputName(in.Name); err != nil {
			return nil, schema.Invalid(field+".name", "%v", err)
		}
		field = "inputs." + in.Name
		if names[in.Name] {
			return nil, schema.Invalid(field, "declared twice")
		}
		names[in.Name] = true
		n, ok := nodes[in.Node]
		if !ok {
			return nil, schema.Invalid(field+".node", "the workflow has no node %q", in.Node)
		}
		cur, ok := n.Inputs[in.Input]
		if !ok {
			return nil, schema.Invalid(field+".input", "node %q (%s) has no input %q in the workflow", in.Node, n.ClassType, in.Input)
		}
		if isLink(cur) {
			return nil, schema.Invalid(field+".input", "input %q of node %q is a link to another node, not a value", in.Input, in.Node)
		}
		if prev, ok := targets[[2]string{in.Node, in.Input}]; ok {
			return nil, schema.Invalid(field+".input", "input %q of node %q is already set by input %q", in.Input, in.Node, prev)
		}
		targets[[2]string{in.Node, in.Input}] = in.Name
		if err := checkInputDecl(in, n.ClassType); err != nil {
			return nil, err
		}
	}
	if b.Inputs == nil {
		b.Inputs = []schema.TemplateInput{}
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, b.Workflow); err != nil {
		return nil, schema.Invalid("workflow", "%v", err)
	}
	return compact.Bytes(), nil
}

func checkInputName(name string) error {
	if name == "" || len(name) > maxInputNameBytes {
		return fmt.Errorf("must be 1 to %d bytes", maxInputNameBytes)
	}
	for i := 0; i < len(name); i++ {
		ch := name[i]
		if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch == '_' || i > 0 && ch >= '0' && ch <= '9') {
			return fmt.Errorf("%q: use letters, digits and _, not starting with a digit", name)
		}
	}
	return nil
}

// checkInputDecl checks one declared input's type, range, choices and default.
func checkInputDecl(in *schema.TemplateInput, class string) error {
	field := "inputs." + in.Name
	if !in.Type.Valid() {
		return schema.Invalid(field+".type", "%q is not one of string, int, float, bool, image, enum", in.Type)
	}
	ranged := in.Type == schema.InputInt || in.Type == schema.InputFloat || in.Type == schema.InputString
	for _, b := range []struct {
		name string
		v    *float64
	}{{"min", in.Min}, {"max", in.Max}} {
		if b.v == nil {
			continue
		}
		switch {
		case !ranged:
			return schema.Invalid(field+"."+b.name, "only int, float and string inputs have a range")
		case math.IsNaN(*b.v) || math.IsInf(*b.v, 0):
			return schema.Invalid(field+"."+b.name, "must be a finite number")
		case in.Type != schema.InputFloat && *b.v != math.Trunc(*b.v):
			return schema.Invalid(field+"."+b.name, "must be an integer for a %s input", in.Type)
		case in.Type == schema.InputString && *b.v < 0:
			return schema.Invalid(field+"."+b.name, "a string's length bound must not be negative")
		}
	}
	if in.Min != nil && in.Max != nil && *in.Min > *in.Max {
		return schema.Invalid(field+".min", "is greater than max")
	}
	if in.Type == schema.InputEnum {
		if len(in.Choices) == 0 {
			return schema.Invalid(field+".choices", "an enum input needs choices")
		}
		if len(in.Choices) > maxEnumChoices {
			return schema.Invalid(field+".choices", "more than %d choices", maxEnumChoices)
		}
		seen := map[string]bool{}
		for _, ch := range in.Choices {
			if len(ch) > maxChoiceBytes {
				return schema.Invalid(field+".choices", "a choice is longer than %d bytes", maxChoiceBytes)
			}
			if seen[ch] {
				return schema.Invalid(field+".choices", "%q is given twice", ch)
			}
			seen[ch] = true
		}
	} else if in.Choices != nil {
		return schema.Invalid(field+".choices", "only enum inputs have choices")
	}
	if in.Type == schema.InputImage {
		if !imageInputClasses[class] || in.Input != "image" {
			return schema.Invalid(field+".input", "an image input must set the image input of a LoadImage or LoadImageMask node")
		}
		if hasValue(in.Default) {
			return schema.Invalid(field+".default", "an image input has no default: the file is uploaded with each job")
		}
	}
	if hasValue(in.Default) {
		if in.Required {
			return schema.Invalid(field+".default", "a required input has no default")
		}
		v, err := inputValue(in, in.Default, nil)
		if err != nil {
			return schema.Invalid(field+".default", "%v", err)
		}
		in.Default = v
	} else {
		in.Default = nil
	}
	return nil
}

func hasValue(raw json.RawMessage) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) > 0 && string(raw) != "null"
}

// isLink reports whether a node input is a link as ComfyUI sees one: a
// two-element array whose first element is a string.
func isLink(v json.RawMessage) bool {
	v = bytes.TrimSpace(v)
	if len(v) == 0 || v[0] != '[' {
		return false
	}
	var arr []json.RawMessage
	if json.Unmarshal(v, &arr) != nil || len(arr) != 2 {
		return false
	}
	a := bytes.TrimSpace(arr[0])
	return len(a) > 0 && a[0] == '"'
}

// inputError is a 400 invalid_request naming a job's template input.
func inputError(name, format string, args ...any) error {
	reason := fmt.Sprintf(format, args...)
	return newAPIError(http.StatusBadRequest, "invalid_request", "inputs."+name+": "+reason).
		with("field", "inputs."+name).with("input", name).with("reason", reason)
}

// resolveInputs checks a job's inputs against its template and returns the
// workflow with them set: every given input must be declared and pass its
// type and range; a required one must be given; a missing one takes its
// default, or keeps the workflow's value. uploads are the names of the
// files uploaded with the job, which image inputs must name.
func resolveInputs(t *schema.Template, given map[string]json.RawMessage, uploads map[string]bool) (json.RawMessage, error) {
	declared := make(map[string]*schema.TemplateInput, len(t.Inputs))
	for i := range t.Inputs {
		declared[t.Inputs[i].Name] = &t.Inputs[i]
	}
	for _, name := range slices.Sorted(maps.Keys(given)) {
		if declared[name] == nil {
			if len(name) > maxInputNameBytes || !utf8.ValidString(name) {
				return nil, newAPIError(http.StatusBadRequest, "invalid_request", "inputs: an unknown input").
					with("field", "inputs").with("reason", "unknown input")
			}
			return nil, inputError(name, "the template %s has no such input", t.Ref())
		}
	}
	set := map[string]map[string]json.RawMessage{} // node -> input -> value
	for i := range t.Inputs {
		in := &t.Inputs[i]
		raw, ok := given[in.Name]
		var v json.RawMessage
		switch {
		case ok:
			var err error
			if v, err = inputValue(in, raw, uploads); err != nil {
				return nil, inputError(in.Name, "%v", err)
			}
		case in.Required:
			return nil, inputError(in.Name, "required")
		case hasValue(in.Default):
			v = in.Default
		default:
			continue
		}
		if set[in.Node] == nil {
			set[in.Node] = map[string]json.RawMessage{}
		}
		set[in.Node][in.Input] = v
	}
	if len(set) == 0 {
		return t.Workflow, nil
	}
	return setNodeInputs(t.Workflow, set)
}

// setNodeInputs writes values into a workflow's node inputs, keeping every
// other field of the nodes as it was.
func setNodeInputs(workflow json.RawMessage, set map[string]map[string]json.RawMessage) (json.RawMessage, error) {
	var nodes map[string]map[string]json.RawMessage
	if err := json.Unmarshal(workflow, &nodes); err != nil {
		return nil, fmt.Errorf("template workflow: %w", err)
	}
	for id, values := range set {
		n, ok := nodes[id]
		if !ok {
			return nil, fmt.Errorf("template workflow has no node %q", id)
		}
		var inputs map[string]json.RawMessage
		if err := json.Unmarshal(n["inputs"], &inputs); err != nil {
			return nil, fmt.Errorf("template workflow node %q inputs: %w", id, err)
		}
		for k, v := range values {
			inputs[k] = v
		}
		b, err := json.Marshal(inputs)
		if err != nil {
			return nil, err
		}
		n["inputs"] = b
	}
	return json.Marshal(nodes)
}

// inputValue checks one value against its declaration and returns it as it
// goes into the workflow. uploads is nil when checking a default.
func inputValue(in *schema.TemplateInput, raw json.RawMessage, uploads map[string]bool) (json.RawMessage, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || !json.Valid(raw) {
		return nil, fmt.Errorf("not valid JSON")
	}
	switch in.Type {
	case schema.InputString, schema.InputEnum, schema.InputImage:
		var s string
		if raw[0] != '"' || json.Unmarshal(raw, &s) != nil {
			return nil, fmt.Errorf("must be a string")
		}
		return stringValue(in, s, uploads)
	case schema.InputBool:
		if string(raw) != "true" && string(raw) != "false" {
			return nil, fmt.Errorf("must be true or false")
		}
		return json.RawMessage(string(raw)), nil
	case schema.InputInt:
		text, f, err := intValue(raw)
		if err != nil {
			return nil, err
		}
		if err := inRange(in, f, text); err != nil {
			return nil, err
		}
		return json.RawMessage(text), nil
	case schema.InputFloat:
		if raw[0] != '-' && (raw[0] < '0' || raw[0] > '9') {
			return nil, fmt.Errorf("must be a number")
		}
		f, err := strconv.ParseFloat(string(raw), 64)
		if err != nil || math.IsInf(f, 0) || math.IsNaN(f) {
			return nil, fmt.Errorf("must be a finite number")
		}
		if err := inRange(in, f, string(raw)); err != nil {
			return nil, err
		}
		return json.RawMessage(strconv.FormatFloat(f, 'g', -1, 64)), nil
	}
	return nil, fmt.Errorf("unknown input type %q", in.Type)
}

// intValue reads an integer: a JSON number without fraction or exponent,
// from -2^63 up to 2^64-1 (ComfyUI seeds go to 2^64-1).
func intValue(raw json.RawMessage) (string, float64, error) {
	s := string(raw)
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return strconv.FormatInt(n, 10), float64(n), nil
	}
	if n, err := strconv.ParseUint(s, 10, 64); err == nil {
		return strconv.FormatUint(n, 10), float64(n), nil
	}
	if _, err := strconv.ParseFloat(s, 64); err == nil && (s[0] == '-' || s[0] >= '0' && s[0] <= '9') {
		return "", 0, fmt.Errorf("must be an integer, not %s", truncate(s, 32))
	}
	return "", 0, fmt.Errorf("must be an integer")
}

func inRange(in *schema.TemplateInput, f float64, text string) error {
	if in.Min != nil && f < *in.Min {
		return fmt.Errorf("%s is below the minimum %s", truncate(text, 32), fmtBound(*in.Min))
	}
	if in.Max != nil && f > *in.Max {
		return fmt.Errorf("%s is above the maximum %s", truncate(text, 32), fmtBound(*in.Max))
	}
	return nil
}

func stringValue(in *schema.TemplateInput, s string, uploads map[string]bool) (json.RawMessage, error) {
	switch in.Type {
	case schema.InputString:
		n := utf8.RuneCountInString(s)
		if len(s) > maxStringInputBytes {
			return nil, fmt.Errorf("longer than %d bytes", maxStringInputBytes)
		}
		if in.Min != nil && float64(n) < *in.Min {
			return nil, fmt.Errorf("shorter than %s characters", fmtBound(*in.Min))
		}
		if in.Max != nil && float64(n) > *in.Max {
			return nil, fmt.Errorf("longer than %s characters", fmtBound(*in.Max))
		}
	case schema.InputEnum:
		ok := false
		for _, c := range in.Choices {
			if c == s {
				ok = true
				break
			}
		}
		if !ok {
			return nil, fmt.Errorf("%q is not one of the choices %s", truncate(s, 64), choiceList(in.Choices))
		}
	case schema.InputImage:
		if !uploads[s] {
			return nil, fmt.Errorf("names no file uploaded with the job (multipart field \"images\")")
		}
	}
	return json.Marshal(s)
}

func fmtBound(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

func choiceList(choices []string) string {
	const show = 10
	b, _ := json.Marshal(choices[:min(len(choices), show)])
	if len(choices) > show {
		return string(b[:len(b)-1]) + ",…]"
	}
	return string(b)
}
