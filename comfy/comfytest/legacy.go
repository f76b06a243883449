package comfytest

import (
	"crypto/sha256"
	"encoding/hex"
	"sort"
)

// runLegacy is the 2023 executor: outputs cached by node id and invalidated by
// comparing nodes with the previous prompt, outputs run smallest-first, each
// one depth-first through its inputs. No timestamps, no execution_success, no
// executed for cached nodes.
func (x *execution) runLegacy() bool {
	lc := x.in.legacy
	x.toClient("execution_start", newObj("prompt_id", x.id))
	x.in.mu.Lock()
	for id := range lc.outputs {
		if !x.prompt.has(id) {
			delete(lc.outputs, id)
		}
	}
	for _, id := range x.prompt.keys {
		x.legacyDeleteIfChanged(id)
	}
	current := map[string]bool{}
	cached := []any{}
	for _, id := range x.prompt.keys {
		if _, ok := lc.outputs[id]; ok {
			current[id] = true
			cached = append(cached, id)
		}
	}
	for _, id := range append([]string(nil), lc.outputsUI.keys...) {
		if !current[id] {
			lc.outputsUI.del(id)
		}
	}
	x.in.mu.Unlock()
	x.toClient("execution_cached", newObj("nodes", cached, "prompt_id", x.id))

	toExecute := append([]string(nil), x.item.outputs...)
	for len(toExecute) > 0 {
		x.in.mu.Lock()
		counts := map[string]int{}
		for _, o := range toExecute {
			counts[o] = len(x.legacyWillExecute(o, 0))
		}
		x.in.mu.Unlock()
		sort.SliceStable(toExecute, func(i, j int) bool {
			if counts[toExecute[i]] != counts[toExecute[j]] {
				return counts[toExecute[i]] < counts[toExecute[j]]
			}
			return toExecute[i] < toExecute[j]
		})
		o := toExecute[0]
		toExecute = toExecute[1:]
		failedID, f, inputs := x.legacyExecute(o, 0)
		if f != nil {
			if f.aborted {
				return false
			}
			x.legacyError(failedID, f, inputs, current)
			break
		}
	}
	x.in.mu.Lock()
	for _, id := range x.executed {
		node, _ := x.prompt.get(id)
		if no, ok := node.(*obj); ok {
			lc.old[id] = no.clone()
		}
	}
	x.ui = lc.outputsUI.clone()
	x.in.mu.Unlock()
	return true
}

// legacyDeleteIfChanged is recursive_output_delete_if_changed.
func (x *execution) legacyDeleteIfChanged(id string) bool {
	lc := x.in.legacy
	node, _ := x.prompt.get(id)
	no, ok := node.(*obj)
	if !ok {
		return true
	}
	inputs := x.nodeInputs(id)
	isChanged, isChangedOld := "", ""
	if c := x.class(id); c != nil && c.name == "LoadImage" {
		if old, ok := lc.old[id]; ok {
			if v, ok := old.get("is_changed"); ok {
				isChangedOld = canonical(v)
			}
		}
		if !no.has("is_changed") {
			no.set("is_changed", []any{x.legacyFileHash(inputs)})
		}
		v, _ := no.get("is_changed")
		isChanged = canonical(v)
	}
	if _, ok := lc.outputs[id]; !ok {
		return true
	}
	toDelete := false
	old, hasOld := lc.old[id]
	switch {
	case isChanged != isChangedOld:
		toDelete = true
	case !hasOld:
		toDelete = true
	default:
		oldInputs, _ := old.get("inputs")
		if pyEqual(inputs, oldInputs) {
			for _, k := range inputs.keys {
				if src, _, ok := isLink(inputs.vals[k]); ok {
					if _, ok := lc.outputs[src]; ok {
						toDelete = x.legacyDeleteIfChanged(src)
					} else {
						toDelete = true
					}
					if toDelete {
						break
					}
				}
			}
		} else {
			toDelete = true
		}
	}
	if toDelete {
		delete(lc.outputs, id)
	}
	return toDelete
}

func (x *execution) legacyFileHash(inputs *obj) string {
	name, _ := inputs.get("image")
	s, _ := name.(string)
	kind, rel := splitAnnotation(s, kindInput)
	clean, _ := joinRel(rel)
	f, ok := x.in.srv.files.read(kind, clean)
	if !ok {
		return uuid4()
	}
	sum := sha256.Sum256(f.data)
	return hex.EncodeToString(sum[:])
}

// legacyWillExecute is recursive_will_execute (duplicates included).
func (x *execution) legacyWillExecute(id string, depth int) []string {
	if _, ok := x.in.legacy.outputs[id]; ok || depth > 1000 {
		return nil
	}
	var will []string
	inputs := x.nodeInputs(id)
	for _, k := range inputs.keys {
		if src, _, ok := isLink(inputs.vals[k]); ok {
			if _, done := x.in.legacy.outputs[src]; !done && x.prompt.has(src) {
				will = append(will, x.legacyWillExecute(src, depth+1)...)
			}
		}
	}
	return append(will, id)
}

// legacyExecute is recursive_execute; it returns the failing node, if any.
func (x *execution) legacyExecute(id string, depth int) (string, *nodeFailure, any) {
	lc := x.in.legacy
	x.in.mu.Lock()
	_, done := lc.outputs[id]
	x.in.mu.Unlock()
	if done {
		return "", nil, nil
	}
	inputs := x.nodeInputs(id)
	for _, k := range inputs.keys {
		if src, _, ok := isLink(inputs.vals[k]); ok && x.prompt.has(src) && depth < 1000 {
			x.in.mu.Lock()
			_, srcDone := lc.outputs[src]
			x.in.mu.Unlock()
			if !srcDone {
				if fid, f, in := x.legacyExecute(src, depth+1); f != nil {
					return fid, f, in
				}
			}
		}
	}
	if x.in.step("node") != nil {
		return id, &nodeFailure{aborted: true}, nil
	}
	class := x.class(id)
	args := newObj()
	for _, k := range inputs.keys {
		v := inputs.vals[k]
		if src, slot, ok := isLink(v); ok {
			x.in.mu.Lock()
			outs := lc.outputs[src]
			x.in.mu.Unlock()
			if slot >= 0 && slot < int64(len(outs)) {
				args.set(k, outs[slot])
			} else {
				args.set(k, nil)
			}
		} else if class.input(k) != nil {
			args.set(k, v)
		}
	}
	if x.client {
		nid := id
		x.setLastNode(&nid)
		x.send("executing", newObj("node", id, "prompt_id", x.id))
	}
	if x.interruptRequested() {
		return id, &nodeFailure{interrupted: true}, nil
	}
	n := &nodeExec{x: x, id: id, class: class, args: args}
	var outs []any
	var ui *obj
	var f *nodeFailure
	if x.inject {
		x.inject = false
		f = n.oom(x.in.srv.opts.VRAM / 2)
	} else if fn := nodeFuncs[class.name]; fn != nil {
		outs, ui, f = fn(n)
	} else {
		f = n.work()
		outs = make([]any, len(class.outputs))
	}
	if f == nil || !f.aborted {
		if x.in.step("node-done") != nil {
			return id, &nodeFailure{aborted: true}, nil
		}
	}
	if f != nil {
		return id, f, formattedInputs(args)
	}
	x.in.mu.Lock()
	lc.outputs[id] = outs
	if ui != nil {
		lc.outputsUI.set(id, ui)
	}
	x.in.mu.Unlock()
	if ui != nil && x.client {
		x.send("executed", newObj("node", id, "output", ui, "prompt_id", x.id))
	}
	x.executed = append(x.executed, id)
	return "", nil, nil
}

// legacyError is the 2023 handle_execution_error.
func (x *execution) legacyError(id string, f *nodeFailure, inputs any, current map[string]bool) {
	lc := x.in.legacy
	ct := any(nil)
	if c := x.class(id); c != nil {
		ct = c.name
	}
	if f.interrupted {
		x.failed = "interrupted"
		x.send("execution_interrupted", newObj("prompt_id", x.id, "node_id", id, "node_type", ct, "executed", x.executedList()))
	} else {
		x.failed = "error"
		if inputs == nil {
			inputs = newObj()
		}
		x.in.mu.Lock()
		outputs := newObj()
		for _, nid := range x.prompt.keys {
			outs, ok := lc.outputs[nid]
			if !ok {
				continue
			}
			slots := []any{}
			for _, v := range outs {
				slots = append(slots, []any{formatValue(v)})
			}
			outputs.set(nid, slots)
		}
		x.in.mu.Unlock()
		x.toClient("execution_error", newObj("prompt_id", x.id, "node_id", id, "node_type", ct, "executed", x.executedList(),
			"exception_message", f.exc.Msg, "exception_type", f.exc.Type, "traceback", f.frames,
			"current_inputs", inputs, "current_outputs", outputs))
	}
	executed := map[string]bool{}
	for _, e := range x.executed {
		executed[e] = true
	}
	x.in.mu.Lock()
	for o := range lc.outputs {
		if !current[o] && !executed[o] {
			delete(lc.outputs, o)
			delete(lc.old, o)
		}
	}
	x.in.mu.Unlock()
}
