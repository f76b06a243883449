package comfytest

import (
	"crypto/sha256"
	"encoding/hex"
	"sort"
	"strconv"
	"time"
)

// The worker runs one prompt at a time, like ComfyUI's prompt_worker thread:
// take the smallest (number, prompt_id) from the heap, execute it, write the
// history entry, broadcast the new queue size, send executing{node:null}.

// cacheEntry is a cached node result (classic/current caching by input
// signature: a node is cached when an identical node with identical inputs
// and identical upstream ran in the previous prompt).
type cacheEntry struct {
	outputs []any
	ui      *obj // the node's UI output, nil when it has none
}

// legacyCache is the 2023 cache: outputs by node id, invalidated by comparing
// each node with its copy from the last prompt that executed it.
type legacyCache struct {
	outputs   map[string][]any
	outputsUI *obj
	old       map[string]*obj
	outcome   map[string]string // prompt id -> success/error/interrupted, for History()
}

func newLegacyCache() *legacyCache {
	return &legacyCache{outputs: map[string][]any{}, outputsUI: newObj(), old: map[string]*obj{}, outcome: map[string]string{}}
}

func (in *instance) legacyStatus(id string) string { return in.legacy.outcome[id] }

func (in *instance) work() {
	defer close(in.done)
	for {
		in.mu.Lock()
		for {
			in.applyFlagsLocked()
			if in.ctx.Err() != nil {
				in.mu.Unlock()
				return
			}
			if len(in.pending) > 0 && !in.srv.isHeld() {
				break
			}
			in.cond.Wait()
		}
		in.mu.Unlock()
		if in.step("dequeue") != nil {
			return
		}
		in.mu.Lock()
		if len(in.pending) == 0 || in.srv.isHeld() {
			in.mu.Unlock()
			continue
		}
		item := in.pending.pop()
		in.running = item
		in.broadcastStatusLocked()
		in.mu.Unlock()

		x := newExecution(in, item)
		if !x.run() {
			return
		}
		in.mu.Lock()
		in.applyFlagsLocked()
		in.mu.Unlock()
	}
}

// applyFlagsLocked applies POST /free: unload models, and with free_memory
// also drop the node cache.
func (in *instance) applyFlagsLocked() {
	if in.flagUnload || in.flagFree {
		in.loaded = nil
	}
	if in.flagFree {
		in.cache = map[string]*cacheEntry{}
		in.legacy.outputs = map[string][]any{}
		in.legacy.outputsUI = newObj()
		in.legacy.old = map[string]*obj{}
	}
	in.flagUnload, in.flagFree = false, false
}

// loadCheckpoint marks a checkpoint loaded and reports whether it was not.
func (in *instance) loadCheckpoint(name string) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, l := range in.loaded {
		if l == name {
			return false
		}
	}
	in.loaded = append(in.loaded, name)
	return true
}

func (in *instance) queueInfoLocked() *obj {
	n := len(in.pending)
	if in.running != nil {
		n++
	}
	return newObj("exec_info", newObj("queue_remaining", n))
}

func (in *instance) broadcastStatusLocked() {
	in.hub.send("", true, jsonFrame("status", newObj("status", in.queueInfoLocked())))
}

// execution is one prompt being run.
type execution struct {
	in       *instance
	gen      Generation
	item     *queueItem
	id       string
	prompt   *obj
	sid      string
	client   bool
	inject   bool // FailNth: fail at the first node
	messages []any
	executed []string
	values   map[string][]any
	ui       *obj // node -> UI output, for history
	meta     *obj
	ps       *obj // progress_state nodes (current)
	sigs     map[string]string
	failed   string // "", "error", "interrupted"
}

func newExecution(in *instance, item *queueItem) *execution {
	x := &execution{
		in: in, gen: in.srv.opts.Generation, item: item, id: item.promptID, prompt: item.prompt,
		values: map[string][]any{}, ui: newObj(), meta: newObj(), ps: newObj(),
	}
	x.sid, x.client = item.clientID()
	x.inject = in.srv.takeFailure()
	return x
}

// send delivers an event the way PromptServer.send_sync does: to the prompt's
// client, or to every socket when the prompt has no client_id.
func (x *execution) send(event string, data any) {
	x.in.hub.send(x.sid, !x.client, jsonFrame(event, data))
}

// toClient sends only when the prompt has a client_id.
func (x *execution) toClient(event string, data any) {
	if x.client {
		x.send(event, data)
	}
}

// addMessage records a status message for the history entry (with a
// timestamp) and sends it to the client, or to everyone when broadcast.
func (x *execution) addMessage(event string, data *obj, broadcast bool) {
	if x.gen == GenLegacy {
		if x.client || broadcast {
			x.send(event, data)
		}
		return
	}
	data.set("timestamp", x.in.srv.nowMS())
	x.messages = append(x.messages, []any{event, data})
	if x.client || broadcast {
		x.send(event, data)
	}
}

func (x *execution) sleep(d time.Duration) *nodeFailure {
	if v := x.in.srv.vclock; v != nil {
		v.Add(int64(d))
		d = 0
	}
	if d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-x.in.ctx.Done():
			t.Stop()
			return &nodeFailure{aborted: true}
		}
	}
	if !x.in.srv.waitUnhung(x.in.ctx.Done()) {
		return &nodeFailure{aborted: true}
	}
	return nil
}

// preview is an image sent as a binary progress frame.
type preview struct {
	format uint32 // 1 JPEG, 2 PNG
	mime   string
	data   []byte
}

// progress is ComfyUI's ProgressBar hook: check for an interrupt, then report
// the step (and the preview) to the client, or to everyone without client_id.
func (x *execution) progress(n *nodeExec, value, max int, p *preview) *nodeFailure {
	if x.interruptRequested() {
		return &nodeFailure{interrupted: true}
	}
	switch x.gen {
	case GenLegacy:
		x.send("progress", newObj("value", value, "max", max))
		if p != nil {
			x.in.hub.send(x.sid, !x.client, binaryFrame(1, u32(p.format), p.data))
		}
	case GenClassic:
		var node any
		if x.client {
			node = n.id
		}
		x.send("progress", newObj("value", value, "max", max, "prompt_id", x.id, "node", node))
		if p != nil {
			x.in.hub.send(x.sid, !x.client, binaryFrame(1, u32(p.format), p.data))
		}
	default:
		x.progressState(n.id, "running", value, max)
		meta := x.client && x.in.hub.previewMeta(x.sid)
		if p != nil && meta {
			md := pyJSON(newObj("node_id", n.id, "prompt_id", x.id, "display_node_id", n.id, "parent_node_id", nil, "real_node_id", n.id, "image_type", p.mime))
			x.in.hub.send(x.sid, false, binaryFrame(4, u32(uint32(len(md))), md, p.data))
		}
		x.send("progress", newObj("value", value, "max", max, "prompt_id", x.id, "node", n.id))
		if p != nil && !meta {
			x.in.hub.send(x.sid, !x.client, binaryFrame(1, u32(p.format), p.data))
		}
	}
	return nil
}

// progressState updates one node of the current generation's progress_state
// and sends the whole map.
func (x *execution) progressState(id, state string, value, max any) {
	x.ps.set(id, newObj("value", value, "max", max, "state", state, "node_id", id, "prompt_id", x.id,
		"display_node_id", id, "parent_node_id", nil, "real_node_id", id))
	x.send("progress_state", newObj("prompt_id", x.id, "nodes", x.ps.clone()))
}

// finishProgress marks a node finished: value = max as last reported, 1.0/1.0
// for nodes without progress.
func (x *execution) finishProgress(id string) {
	var value, max any = 1.0, 1.0
	if cur, ok := x.ps.get(id); ok {
		m, _ := cur.(*obj).get("max")
		value, max = m, m
	}
	x.progressState(id, "finished", value, max)
}

func (x *execution) interruptRequested() bool {
	x.in.mu.Lock()
	defer x.in.mu.Unlock()
	return x.in.interrupted
}

func (x *execution) setLastNode(id *string) {
	x.in.mu.Lock()
	x.in.lastNode = id
	x.in.mu.Unlock()
}

// pngTexts are the tEXt chunks ComfyUI writes into saved PNGs.
func (x *execution) pngTexts() [][2]string {
	texts := [][2]string{{"prompt", string(pyJSON(x.prompt))}}
	if eo, ok := x.item.extra.(*obj); ok {
		if pi, ok := eo.get("extra_pnginfo"); ok {
			if po, ok := pi.(*obj); ok {
				for _, k := range po.keys {
					texts = append(texts, [2]string{k, string(pyJSON(po.vals[k]))})
				}
			}
		}
	}
	return texts
}

// run executes the prompt and writes its history entry; it returns false when
// the server stopped meanwhile.
func (x *execution) run() bool {
	x.in.mu.Lock()
	x.in.interrupted = false
	x.in.clientSID, x.in.hasClient = x.sid, x.client
	x.in.mu.Unlock()
	x.in.srv.opts.Logger.Debug("prompt started", "prompt_id", x.id)

	var ok bool
	if x.gen == GenLegacy {
		ok = x.runLegacy()
	} else {
		ok = x.runGraph()
	}
	x.setLastNode(nil)
	if !ok {
		return false
	}
	if x.in.step("history") != nil {
		return false
	}
	x.in.mu.Lock()
	x.writeHistoryLocked()
	x.in.running = nil
	x.in.executed++
	x.in.broadcastStatusLocked()
	x.in.mu.Unlock()
	x.toClient("executing", newObj("node", nil, "prompt_id", x.id))
	x.in.srv.opts.Logger.Debug("prompt finished", "prompt_id", x.id, "outcome", x.outcome())
	return true
}

func (x *execution) outcome() string {
	if x.failed == "" {
		return "success"
	}
	return x.failed
}

func (x *execution) writeHistoryLocked() {
	h := x.in.history
	if _, exists := h.get(x.id); !exists && h.len() > maxHistory {
		h.del(h.keys[0])
	}
	entry := newObj("prompt", x.item.tuple(), "outputs", x.ui)
	if x.gen == GenLegacy {
		x.in.legacy.outcome[x.id] = x.outcome()
	} else {
		entry.set("status", newObj("status_str", map[bool]string{true: "success", false: "error"}[x.failed == ""],
			"completed", x.failed == "", "messages", x.messages))
		entry.set("meta", x.meta)
	}
	h.set(x.id, entry)
}

// signatures computes every node's input signature: class, inputs, and the
// signatures of linked nodes, so identical subgraphs share cache entries.
func (x *execution) signatures() map[string]string {
	sigs := map[string]string{}
	visiting := map[string]bool{}
	var sig func(id string) string
	sig = func(id string) string {
		if s, ok := sigs[id]; ok {
			return s
		}
		if visiting[id] {
			return "cycle"
		}
		visiting[id] = true
		defer delete(visiting, id)
		node, _ := x.prompt.get(id)
		no, _ := node.(*obj)
		ct, _ := no.get("class_type")
		inputs, _ := no.get("inputs")
		io, _ := inputs.(*obj)
		h := sha256.New()
		h.Write([]byte(canonical(ct)))
		h.Write([]byte{0})
		h.Write([]byte(x.isChanged(id, ct)))
		var keys []string
		if io != nil {
			keys = append(keys, io.keys...)
		}
		sort.Strings(keys)
		for _, k := range keys {
			h.Write([]byte{0})
			h.Write([]byte(k))
			h.Write([]byte{1})
			v := io.vals[k]
			if src, slot, ok := isLink(v); ok {
				if x.prompt.has(src) {
					h.Write([]byte("link:" + sig(src) + ":" + strconv.FormatInt(slot, 10)))
				} else {
					h.Write([]byte("missing:" + src))
				}
				continue
			}
			h.Write([]byte(canonical(v)))
		}
		s := hex.EncodeToString(h.Sum(nil))
		sigs[id] = s
		return s
	}
	for _, id := range x.prompt.keys {
		sig(id)
	}
	return sigs
}

// isChanged is IS_CHANGED: LoadImage depends on the file's bytes.
func (x *execution) isChanged(id string, ct any) string {
	if ct != "LoadImage" {
		return ""
	}
	node, _ := x.prompt.get(id)
	inputs, _ := node.(*obj).get("inputs")
	io, _ := inputs.(*obj)
	name, _ := io.get("image")
	s, _ := name.(string)
	kind, rel := splitAnnotation(s, kindInput)
	clean, _ := joinRel(rel)
	f, ok := x.in.srv.files.read(kind, clean)
	if !ok {
		return "missing:" + uuid4()
	}
	sum := sha256.Sum256(f.data)
	return hex.EncodeToString(sum[:])
}

// isLink is comfy_execution's is_link: [str, int].
func isLink(v any) (string, int64, bool) {
	l, ok := v.([]any)
	if !ok || len(l) != 2 {
		return "", 0, false
	}
	src, ok := l[0].(string)
	if !ok {
		return "", 0, false
	}
	switch slot := l[1].(type) {
	case int64:
		return src, slot, true
	case bool:
		if slot {
			return src, 1, true
		}
		return src, 0, true
	}
	return "", 0, false
}

func (x *execution) class(id string) *nodeClass {
	node, _ := x.prompt.get(id)
	ct, _ := node.(*obj).get("class_type")
	name, _ := ct.(string)
	return x.in.srv.cat.get(name)
}

func (x *execution) nodeInputs(id string) *obj {
	node, _ := x.prompt.get(id)
	inputs, _ := node.(*obj).get("inputs")
	io, _ := inputs.(*obj)
	if io == nil {
		return newObj()
	}
	return io
}

// runGraph is the classic/current executor: cache check, execution list with
// ComfyUI's node picking, per-node events, error and interrupt handling.
func (x *execution) runGraph() bool {
	x.addMessage("execution_start", newObj("prompt_id", x.id), false)
	x.sigs = x.signatures()
	x.in.mu.Lock()
	keep := map[string]bool{}
	for _, s := range x.sigs {
		keep[s] = true
	}
	for s := range x.in.cache {
		if !keep[s] {
			delete(x.in.cache, s)
		}
	}
	cached := []any{}
	for _, id := range x.prompt.keys {
		if x.in.cache[x.sigs[id]] != nil {
			cached = append(cached, id)
		}
	}
	x.in.mu.Unlock()
	x.addMessage("execution_cached", newObj("nodes", cached, "prompt_id", x.id), false)

	list := newExecList(x)
	for _, o := range x.item.outputs {
		list.addNode(o)
	}
	for !list.empty() {
		id, cycle := list.stage()
		if cycle != "" {
			x.handleError(cycle, &nodeFailure{exc: pyErr{Type: "graph.DependencyCycleError", Msg: "Dependency cycle detected"}, frames: []any{}}, []any{})
			return true
		}
		if x.in.step("node") != nil {
			return false
		}
		f, inputs := x.executeNode(id)
		if f != nil {
			if f.aborted {
				return false
			}
			x.handleError(id, f, inputs)
			return true
		}
		list.complete()
	}
	x.addMessage("execution_success", newObj("prompt_id", x.id), false)
	return true
}

func (x *execution) cachedEntry(id string) *cacheEntry {
	x.in.mu.Lock()
	defer x.in.mu.Unlock()
	return x.in.cache[x.sigs[id]]
}

// resolveArgs is get_input_data: linked inputs take the upstream output,
// widget values are taken when the class declares the input; hidden inputs
// (prompt, extra_pnginfo) come last.
func (x *execution) resolveArgs(id string, class *nodeClass) *obj {
	args := newObj()
	inputs := x.nodeInputs(id)
	for _, k := range inputs.keys {
		v := inputs.vals[k]
		if src, slot, ok := isLink(v); ok {
			outs := x.values[src]
			if outs == nil {
				if e := x.cachedEntry(src); e != nil {
					outs = e.outputs
				}
			}
			if slot >= 0 && slot < int64(len(outs)) {
				args.set(k, outs[slot])
			} else {
				args.set(k, nil)
			}
			continue
		}
		if class.input(k) != nil {
			args.set(k, v)
		}
	}
	if class.hidden != nil {
		for _, k := range class.hidden.keys {
			switch class.hidden.vals[k] {
			case "PROMPT":
				args.set(k, x.prompt)
			case "EXTRA_PNGINFO":
				if eo, ok := x.item.extra.(*obj); ok {
					if v, ok := eo.get("extra_pnginfo"); ok {
						args.set(k, v)
					}
				}
			}
		}
	}
	return args
}

// formattedInputs renders current_inputs of an execution_error.
func formattedInputs(args *obj) *obj {
	out := newObj()
	for _, k := range args.keys {
		out.set(k, []any{formatValue(args.vals[k])})
	}
	return out
}

// executeNode runs one node of the execution list. It returns the failure
// and the formatted inputs for the error report.
func (x *execution) executeNode(id string) (*nodeFailure, any) {
	class := x.class(id)
	if e := x.cachedEntry(id); e != nil {
		var out any
		if e.ui != nil {
			out = e.ui
		}
		if x.client {
			x.send("executed", newObj("node", id, "display_node", id, "output", out, "prompt_id", x.id))
		}
		if e.ui != nil && (x.gen == GenClassic || x.client) {
			x.recordUI(id, e.ui)
		}
		if x.gen == GenCurrent {
			x.progressState(id, "finished", int64(1), int64(1))
		}
		x.values[id] = e.outputs
		return nil, nil
	}
	args := x.resolveArgs(id, class)
	if x.gen == GenCurrent {
		x.progressState(id, "running", 0.0, 1.0)
	}
	if x.client {
		nid := id
		x.setLastNode(&nid)
		x.send("executing", newObj("node", id, "display_node", id, "prompt_id", x.id))
	}
	if x.interruptRequested() {
		return &nodeFailure{interrupted: true}, nil
	}
	n := &nodeExec{x: x, id: id, class: class, args: args}
	var outs []any
	var ui *obj
	var f *nodeFailure
	if x.inject {
		x.inject = false
		f = n.oom(int64(x.in.srv.opts.VRAM) / 2)
	} else if fn := nodeFuncs[class.name]; fn != nil {
		outs, ui, f = fn(n)
	} else {
		f = n.work()
		outs = make([]any, len(class.outputs))
	}
	if f == nil || !f.aborted {
		if x.in.step("node-done") != nil {
			return &nodeFailure{aborted: true}, nil
		}
	}
	if f != nil {
		return f, formattedInputs(args)
	}
	x.in.mu.Lock()
	x.in.cache[x.sigs[id]] = &cacheEntry{outputs: outs, ui: ui}
	x.in.mu.Unlock()
	x.values[id] = outs
	if ui != nil {
		x.recordUI(id, ui)
		if x.client {
			x.send("executed", newObj("node", id, "display_node", id, "output", ui, "prompt_id", x.id))
		}
	}
	x.executed = append(x.executed, id)
	if x.gen == GenCurrent {
		x.finishProgress(id)
	}
	return nil, nil
}

func (x *execution) recordUI(id string, ui *obj) {
	x.ui.set(id, ui)
	x.meta.set(id, newObj("node_id", id, "display_node", id, "parent_node", nil, "real_node_id", id))
}

func (x *execution) executedList() []any {
	out := make([]any, len(x.executed))
	for i, id := range x.executed {
		out[i] = id
	}
	return out
}

// handleError reports a failed or interrupted node.
func (x *execution) handleError(id string, f *nodeFailure, inputs any) {
	ct := any(nil)
	if c := x.class(id); c != nil {
		ct = c.name
	}
	if f.interrupted {
		x.failed = "interrupted"
		x.addMessage("execution_interrupted", newObj("prompt_id", x.id, "node_id", id, "node_type", ct, "executed", x.executedList()), true)
		return
	}
	x.failed = "error"
	if inputs == nil {
		inputs = newObj()
	}
	current := []any{}
	for _, nid := range x.prompt.keys {
		current = append(current, nid)
	}
	if x.gen == GenClassic {
		for i, j := 0, len(current)-1; i < j; i, j = i+1, j-1 {
			current[i], current[j] = current[j], current[i]
		}
	}
	x.addMessage("execution_error", newObj("prompt_id", x.id, "node_id", id, "node_type", ct, "executed", x.executedList(),
		"exception_message", f.exc.Msg, "exception_type", f.exc.Type, "traceback", f.frames,
		"current_inputs", inputs, "current_outputs", current), false)
}

// execList is comfy_execution's ExecutionList: pending nodes in insertion
// order, each blocked by its uncached inputs.
type execList struct {
	x          *execution
	pending    []string
	isPending  map[string]bool
	blockCount map[string]int
	blocking   map[string][]string
	staged     string
}

func newExecList(x *execution) *execList {
	return &execList{x: x, isPending: map[string]bool{}, blockCount: map[string]int{}, blocking: map[string][]string{}}
}

func (l *execList) cached(id string) bool { return l.x.cachedEntry(id) != nil }

func (l *execList) addNode(id string) {
	stack := []string{id}
	type link struct{ from, to string }
	var links []link
	for len(stack) > 0 {
		u := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if l.isPending[u] {
			continue
		}
		l.isPending[u] = true
		l.pending = append(l.pending, u)
		l.blockCount[u] = 0
		inputs := l.x.nodeInputs(u)
		for _, k := range inputs.keys {
			if src, _, ok := isLink(inputs.vals[k]); ok && l.x.prompt.has(src) {
				if !l.cached(src) {
					stack = append(stack, src)
				}
				links = append(links, link{src, u})
			}
		}
	}
	for _, lk := range links {
		if l.cached(lk.from) {
			continue
		}
		l.addNode(lk.from)
		already := false
		for _, b := range l.blocking[lk.from] {
			if b == lk.to {
				already = true
				break
			}
		}
		if !already {
			l.blocking[lk.from] = append(l.blocking[lk.from], lk.to)
			l.blockCount[lk.to]++
		}
	}
}

func (l *execList) empty() bool { return len(l.pending) == 0 }

func (l *execList) isOutput(id string) bool {
	c := l.x.class(id)
	return c != nil && c.outputNode
}

// stage picks the next node the way ux_friendly_pick_node does: an output
// node first, then a node feeding an output, then one two steps from an
// output, else the first ready node. It returns a node id to blame when the
// remaining nodes form a cycle.
func (l *execList) stage() (id string, cycle string) {
	var ready []string
	for _, n := range l.pending {
		if l.blockCount[n] == 0 {
			ready = append(ready, n)
		}
	}
	if len(ready) == 0 {
		return "", l.pending[0]
	}
	pick := ""
	for _, n := range ready {
		if l.isOutput(n) {
			pick = n
			break
		}
	}
	if pick == "" {
	second:
		for _, n := range ready {
			for _, b := range l.blocking[n] {
				if l.isOutput(b) {
					pick = n
					break second
				}
			}
		}
	}
	if pick == "" {
	third:
		for _, n := range ready {
			for _, b := range l.blocking[n] {
				for _, b2 := range l.blocking[b] {
					if l.isOutput(b2) {
						pick = n
						break third
					}
				}
			}
		}
	}
	if pick == "" {
		pick = ready[0]
	}
	l.staged = pick
	return pick, ""
}

func (l *execList) complete() {
	id := l.staged
	l.staged = ""
	delete(l.isPending, id)
	for i, n := range l.pending {
		if n == id {
			l.pending = append(l.pending[:i:i], l.pending[i+1:]...)
			break
		}
	}
	for _, b := range l.blocking[id] {
		l.blockCount[b]--
	}
	delete(l.blocking, id)
}
