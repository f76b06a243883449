package comfytest

import (
	"fmt"
	"math/big"
	"sort"
	"strings"
)

// Validation follows ComfyUI's validate_prompt / validate_inputs step by step,
// including where a Python exception would escape: such an exception becomes
// exception_during_inner_validation or exception_during_validation when
// ComfyUI catches it, and an HTTP 500 when it escapes the request handler.

// promptCheck is the outcome of validate_prompt.
type promptCheck struct {
	ok         bool
	err        any      // the "error" member of a 400 body
	outputs    []string // outputs to execute
	nodeErrors any      // *obj, or []any{} for the old empty shape
}

type vresult struct {
	ok      bool
	reasons []any
}

type validator struct {
	in        *instance
	cat       *catalog
	gen       Generation
	prompt    *obj
	order     []string // validated node ids, in the order ComfyUI's dict fills
	validated map[string]*vresult
	depth     int
}

// emptyNodeErrors is node_errors for the early failures: [] before the
// object shape became the rule.
func (v *validator) emptyNodeErrors() any {
	if v.gen == GenCurrent {
		return newObj()
	}
	return []any{}
}

func errBody(typ, message, details string, extra *obj) *obj {
	if extra == nil {
		extra = newObj()
	}
	return newObj("type", typ, "message", message, "details", details, "extra_info", extra)
}

// validatePrompt checks a prompt. A non-nil *pyErr means the request handler
// itself raised (HTTP 500).
func (in *instance) validatePrompt(promptV any, targets any) (*promptCheck, *pyErr) {
	v := &validator{in: in, cat: in.srv.cat, gen: in.srv.opts.Generation, validated: map[string]*vresult{}}
	prompt, isObj := promptV.(*obj)
	if !isObj {
		switch t := promptV.(type) {
		case []any:
			if len(t) == 0 {
				return v.noOutputs(), nil
			}
			if _, err := pyGetItem(t, t[0]); err != nil {
				return nil, err
			}
			return nil, &pyErr{Type: "TypeError", Msg: "list indices must be integers or slices, not str"}
		case string:
			if t == "" {
				return v.noOutputs(), nil
			}
			return nil, &pyErr{Type: "TypeError", Msg: "string indices must be integers, not 'str'"}
		}
		return nil, &pyErr{Type: "TypeError", Msg: fmt.Sprintf("'%s' object is not iterable", pyTypeName(promptV))}
	}
	v.prompt = prompt
	var outputs []string
	for _, id := range prompt.keys {
		node := prompt.vals[id]
		has, err := pyContains(node, "class_type")
		if err != nil {
			return nil, err
		}
		if !has {
			return &promptCheck{err: errBody("invalid_prompt", "Cannot execute because a node is missing the class_type property.", "Node ID '#"+id+"'", nil), nodeErrors: v.emptyNodeErrors()}, nil
		}
		ct, err := pyGetItem(node, "class_type")
		if err != nil {
			return nil, err
		}
		switch ct.(type) {
		case []any:
			return nil, &pyErr{Type: "TypeError", Msg: "unhashable type: 'list'"}
		case *obj:
			return nil, &pyErr{Type: "TypeError", Msg: "unhashable type: 'dict'"}
		}
		name, _ := ct.(string)
		class := v.cat.get(name)
		if _, isStr := ct.(string); !isStr || class == nil {
			return &promptCheck{err: errBody("invalid_prompt", fmt.Sprintf("Cannot execute because node %s does not exist.", pyStr(ct)), "Node ID '#"+id+"'", nil), nodeErrors: v.emptyNodeErrors()}, nil
		}
		if class.outputNode {
			outputs = append(outputs, id)
		}
	}
	if v.gen == GenCurrent && targets != nil {
		if list, ok := targets.([]any); ok {
			want := map[string]bool{}
			for _, t := range list {
				if s, ok := t.(string); ok {
					want[s] = true
				}
			}
			kept := outputs[:0]
			for _, o := range outputs {
				if want[o] {
					kept = append(kept, o)
				}
			}
			outputs = kept
		}
	}
	if len(outputs) == 0 {
		return v.noOutputs(), nil
	}
	// Python iterates a set of output ids; the fake uses reverse prompt order,
	// which reproduces the execution order of the recorded traces.
	for i, j := 0, len(outputs)-1; i < j; i, j = i+1, j-1 {
		outputs[i], outputs[j] = outputs[j], outputs[i]
	}

	var good []string
	type outErr struct {
		out     string
		reasons []any
	}
	var errs []outErr
	nodeErrors := newObj()
	for _, o := range outputs {
		r, exc := v.validateInputs(o)
		valid, reasons := false, []any(nil)
		if exc != nil {
			reasons = []any{errBody("exception_during_validation", "Exception when validating node", exc.Msg,
				newObj("exception_type", exc.Type, "traceback", v.traceback(exc, false)))}
			v.record(o, &vresult{ok: false, reasons: reasons})
		} else {
			valid, reasons = r.ok, r.reasons
		}
		if valid {
			good = append(good, o)
			continue
		}
		errs = append(errs, outErr{o, reasons})
		for _, id := range v.order {
			res := v.validated[id]
			if res.ok || len(res.reasons) == 0 {
				continue
			}
			entryV, ok := nodeErrors.get(id)
			if !ok {
				node, _ := prompt.get(id)
				ct, _ := pyGetItem(node, "class_type")
				entryV = newObj("errors", res.reasons, "dependent_outputs", []any{}, "class_type", ct)
				nodeErrors.set(id, entryV)
			}
			entry := entryV.(*obj)
			deps, _ := entry.get("dependent_outputs")
			entry.set("dependent_outputs", append(deps.([]any), o))
		}
	}
	if len(good) == 0 {
		var lines []string
		for _, e := range errs {
			for _, r := range e.reasons {
				ro := r.(*obj)
				m, _ := ro.get("message")
				d, _ := ro.get("details")
				lines = append(lines, fmt.Sprintf("%s: %s", pyStr(m), pyStr(d)))
			}
		}
		return &promptCheck{err: errBody("prompt_outputs_failed_validation", "Prompt outputs failed validation", strings.Join(lines, "\n"), nil), nodeErrors: nodeErrors}, nil
	}
	return &promptCheck{ok: true, outputs: good, nodeErrors: nodeErrors}, nil
}

func (v *validator) noOutputs() *promptCheck {
	return &promptCheck{err: errBody("prompt_no_outputs", "Prompt has no outputs", "", nil), nodeErrors: v.emptyNodeErrors()}
}

func (v *validator) record(id string, r *vresult) {
	if _, ok := v.validated[id]; !ok {
		v.order = append(v.order, id)
	}
	v.validated[id] = r
}

// inputOrder is the order validate_inputs visits a class's inputs. ComfyUI
// iterates a set; the fake uses declaration order for the classic and legacy
// generations and sorted names for the current one, which reproduces the error
// order in the recorded 400 bodies.
func (v *validator) inputOrder(class *nodeClass) []*inputSpec {
	specs := append([]*inputSpec(nil), class.inputs...)
	if v.gen == GenCurrent {
		sort.SliceStable(specs, func(i, j int) bool { return specs[i].name < specs[j].name })
	}
	return specs
}

func (v *validator) validateInputs(id string) (*vresult, *pyErr) {
	if r, ok := v.validated[id]; ok {
		return r, nil
	}
	// A cycle recurses until Python's recursion limit; ComfyUI then reports
	// the RecursionError where it is caught.
	v.depth++
	defer func() { v.depth-- }()
	if v.depth > 200 {
		return nil, &pyErr{Type: "RecursionError", Msg: "maximum recursion depth exceeded"}
	}
	node, _ := v.prompt.get(id)
	inputsV, err := pyGetItem(node, "inputs")
	if err != nil {
		err.Site = "    inputs = prompt[unique_id]['inputs']\n             ~~~~~~~~~~~~~~~~~^^^^^^^^^^\n"
		return nil, err
	}
	ctV, _ := pyGetItem(node, "class_type")
	class := v.cat.get(ctV.(string))
	var errors []any
	valid := true
	validateSet := map[string]bool{}
	for _, n := range class.validate {
		validateSet[n] = true
	}
	for _, spec := range v.inputOrder(class) {
		x := spec.name
		has, err := pyContains(inputsV, x)
		if err != nil {
			return nil, err
		}
		if !has {
			if spec.category == "required" {
				errors = append(errors, errBody("required_input_missing", "Required input is missing", x, newObj("input_name", x)))
			}
			continue
		}
		val, err := pyGetItem(inputsV, x)
		if err != nil {
			return nil, err
		}
		info := spec.configFor(v.in)
		if link, isList := val.([]any); isList {
			if len(link) != 2 {
				errors = append(errors, errBody("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", x,
					newObj("input_name", x, "input_config", info, "received_value", val)))
				continue
			}
			oNode, err := pyGetItem(v.prompt, link[0])
			if err != nil {
				return nil, err
			}
			oCT, err := pyGetItem(oNode, "class_type")
			if err != nil {
				return nil, err
			}
			oName, _ := oCT.(string)
			oClass := v.cat.get(oName)
			if oClass == nil {
				return nil, keyError(oCT)
			}
			idx, isIdx := pyIndex(link[1])
			if !isIdx {
				return nil, &pyErr{Type: "TypeError", Msg: fmt.Sprintf("tuple indices must be integers or slices, not %s", pyTypeName(link[1]))}
			}
			if idx < 0 {
				idx += int64(len(oClass.outputs))
			}
			if idx < 0 || idx >= int64(len(oClass.outputs)) {
				return nil, &pyErr{Type: "IndexError", Msg: "tuple index out of range"}
			}
			received := oClass.outputs[idx]
			if !validateSet[x] && !typesCompatible(received, spec.typ) {
				details := fmt.Sprintf("%s, received_type(%s) mismatch input_type(%s)", x, received, pyStr(spec.typ))
				if v.gen == GenLegacy {
					details = fmt.Sprintf("%s, %s != %s", x, received, pyStr(spec.typ))
				}
				errors = append(errors, errBody("return_type_mismatch", "Return type mismatch between linked nodes", details,
					newObj("input_name", x, "input_config", info, "received_type", received, "linked_node", val)))
				continue
			}
			oID := link[0].(string)
			r, exc := v.validateInputs(oID)
			if exc != nil {
				reasons := []any{errBody("exception_during_inner_validation", "Exception when validating inner node", exc.Msg,
					newObj("input_name", x, "input_config", info, "exception_message", exc.Msg, "exception_type", exc.Type,
						"traceback", v.traceback(exc, true), "linked_node", val))}
				v.record(oID, &vresult{ok: false, reasons: reasons})
				valid = false
				continue
			}
			if !r.ok {
				valid = false
			}
			continue
		}
		orig := val
		if o, isObj := val.(*obj); isObj && v.gen == GenCurrent && o.has("__value__") {
			val, _ = o.get("__value__")
			inputsV.(*obj).set(x, val)
		}
		converted, cerr := convertInput(val, spec.typ)
		if cerr != nil {
			errors = append(errors, errBody("invalid_input_type", fmt.Sprintf("Failed to convert an input value to a %s value", pyStr(spec.typ)),
				fmt.Sprintf("%s, %s, %s", x, pyStr(orig), cerr.Msg),
				newObj("input_name", x, "input_config", info, "received_value", orig, "exception_message", cerr.Msg)))
			continue
		}
		if converted != nil {
			val = converted
			if io, ok := inputsV.(*obj); ok {
				io.set(x, val)
			}
		}
		if validateSet[x] {
			continue
		}
		if min, ok := spec.opts.get("min"); ok {
			if less, cmp := pyLess(val, min); cmp && less {
				errors = append(errors, errBody("value_smaller_than_min", fmt.Sprintf("Value %s smaller than min of %s", pyStr(val), pyStr(min)), x,
					newObj("input_name", x, "input_config", info, "received_value", val)))
				continue
			}
		}
		if max, ok := spec.opts.get("max"); ok {
			if less, cmp := pyLess(max, val); cmp && less {
				errors = append(errors, errBody("value_bigger_than_max", fmt.Sprintf("Value %s bigger than max of %s", pyStr(val), pyStr(max)), x,
					newObj("input_name", x, "input_config", info, "received_value", val)))
				continue
			}
		}
		if options := spec.comboOptions(v.in); options != nil || spec.dynamic != nil {
			found := false
			for _, o := range options {
				if pyEqual(o, val) {
					found = true
					break
				}
			}
			if !found {
				inputConfig := info
				listInfo := pyRepr(options)
				if options == nil {
					listInfo = "[]"
				}
				if len(options) > 20 {
					listInfo = fmt.Sprintf("(list of length %d)", len(options))
					inputConfig = nil
				}
				errors = append(errors, errBody("value_not_in_list", "Value not in list", fmt.Sprintf("%s: '%s' not in %s", x, pyStr(val), listInfo),
					newObj("input_name", x, "input_config", inputConfig, "received_value", val)))
				continue
			}
		}
	}
	if len(class.validate) > 0 {
		for _, x := range class.validate {
			has, _ := pyContains(inputsV, x)
			var val any
			if has {
				val, _ = pyGetItem(inputsV, x)
			}
			msg, exc := v.customValidate(class, x, val)
			if exc != nil {
				return nil, exc
			}
			if msg != "" {
				errors = append(errors, errBody("custom_validation_failed", "Custom validation failed for node", x+" - "+msg, newObj("input_name", x)))
			}
		}
	}
	r := &vresult{ok: len(errors) == 0 && valid, reasons: errors}
	if r.reasons == nil {
		r.reasons = []any{}
	}
	v.record(id, r)
	return r, nil
}

// customValidate runs a class's VALIDATE_INPUTS. It returns the failure text,
// or "" when the value is accepted.
func (v *validator) customValidate(class *nodeClass, x string, val any) (string, *pyErr) {
	switch class.name {
	case "LoadImage":
		name, ok := val.(string)
		if !ok {
			if _, isList := val.([]any); isList || val == nil {
				// A linked or missing input reaches VALIDATE_INPUTS as None.
				return "", &pyErr{Type: "AttributeError", Msg: "'NoneType' object has no attribute 'endswith'"}
			}
			return "", &pyErr{Type: "AttributeError", Msg: fmt.Sprintf("'%s' object has no attribute 'endswith'", pyTypeName(val))}
		}
		if _, ok := v.in.srv.files.annotated(name, kindInput); !ok {
			return "Invalid image file: " + name, nil
		}
	}
	return "", nil
}

// convertInput applies ComfyUI's int()/float()/str()/bool() conversion for the
// primitive input types; it returns nil when the type takes the value as is.
func convertInput(val any, typ any) (any, *pyErr) {
	switch typ {
	case "INT":
		return pyInt(val)
	case "FLOAT":
		f, err := pyFloat(val)
		if err != nil {
			return nil, err
		}
		return f, nil
	case "STRING":
		return pyStr(val), nil
	case "BOOLEAN":
		return pyTruthy(val), nil
	}
	return nil, nil
}

// typesCompatible is validate_node_input: equal types, the "*" wildcard, or
// overlapping comma-separated unions.
func typesCompatible(received string, want any) bool {
	ws, ok := want.(string)
	if !ok {
		return false
	}
	if received == ws || received == "*" || ws == "*" {
		return true
	}
	got := map[string]bool{}
	for _, t := range strings.Split(received, ",") {
		got[strings.TrimSpace(t)] = true
	}
	for _, t := range strings.Split(ws, ",") {
		if got[strings.TrimSpace(t)] {
			return true
		}
	}
	return false
}

// traceback renders the frames ComfyUI reports for a validation exception.
func (v *validator) traceback(exc *pyErr, inner bool) []any {
	file := `  File "/srv/comfyui/execution.py"`
	var call, callLine, site, siteLine string
	switch v.gen {
	case GenCurrent:
		call, callLine = "    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n", "838"
		siteLine = "818"
	default:
		call, callLine = "    r = validate_inputs(prompt, o_id, validated)\n        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n", "612"
		siteLine = "592"
	}
	switch {
	case exc.Site != "":
		site = exc.Site
	case exc.Type == "KeyError":
		site = "    o_class_type = prompt[o_id]['class_type']\n                   ~~~~~~^^^^^^\n"
	case exc.Type == "IndexError" || exc.Type == "TypeError":
		site = "    received_type = r[val[1]]\n                    ~^^^^^^^^\n"
	default:
		site = "    ret = _map_node_over_list(obj_class, input_filtered, \"VALIDATE_INPUTS\")\n"
	}
	frames := []any{}
	if inner {
		frames = append(frames, fmt.Sprintf("%s, line %s, in validate_inputs\n%s", file, callLine, call))
	} else {
		frames = append(frames, fmt.Sprintf("%s, line %s, in validate_prompt\n    m = validate_inputs(prompt, o, validated)\n", file, "700"))
	}
	frames = append(frames, fmt.Sprintf("%s, line %s, in validate_inputs\n%s", file, siteLine, site))
	return frames
}

// bigOrInt converts a Python int to int64 when it fits.
func bigOrInt(v any) (int64, bool) {
	switch t := v.(type) {
	case int64:
		return t, true
	case *big.Int:
		if t.IsInt64() {
			return t.Int64(), true
		}
	}
	return 0, false
}
