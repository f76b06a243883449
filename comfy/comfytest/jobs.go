package comfytest

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
)

// The jobs API (GET /api/jobs, /api/jobs/{id}) is the current generation's
// unified view over running, pending and finished prompts.

var jobStatuses = []string{"pending", "in_progress", "completed", "failed"}

func (in *instance) getJobs(w http.ResponseWriter, r *http.Request, _ string) {
	q := r.URL.Query()
	var filter map[string]bool
	if s := q.Get("status"); s != "" {
		filter = map[string]bool{}
		var invalid []string
		for _, part := range strings.Split(s, ",") {
			p := strings.ToLower(strings.TrimSpace(part))
			if p == "" {
				continue
			}
			known := false
			for _, st := range jobStatuses {
				if st == p {
					known = true
				}
			}
			if !known {
				invalid = append(invalid, p)
			}
			filter[p] = true
		}
		if len(invalid) > 0 {
			writeJSONResponse(w, 400, newObj("error", fmt.Sprintf("Invalid status value(s): %s. Valid values: %s", strings.Join(invalid, ", "), strings.Join(jobStatuses, ", "))))
			return
		}
	}
	sortBy := "created_at"
	if v, ok := getQuery(r, "sort_by"); ok {
		sortBy = strings.ToLower(v)
	}
	if sortBy != "created_at" && sortBy != "execution_duration" {
		writeJSONResponse(w, 400, newObj("error", "sort_by must be 'created_at' or 'execution_duration'"))
		return
	}
	sortOrder := "desc"
	if v, ok := getQuery(r, "sort_order"); ok {
		sortOrder = strings.ToLower(v)
	}
	if sortOrder != "asc" && sortOrder != "desc" {
		writeJSONResponse(w, 400, newObj("error", "sort_order must be 'asc' or 'desc'"))
		return
	}
	var limit any
	limitN := -1
	if v, ok := getQuery(r, "limit"); ok {
		n, err := pyInt(v)
		i, fits := bigOrInt(n)
		if err != nil || !fits {
			writeJSONResponse(w, 400, newObj("error", "limit must be an integer"))
			return
		}
		if i <= 0 {
			writeJSONResponse(w, 400, newObj("error", "limit must be a positive integer"))
			return
		}
		limit, limitN = i, int(i)
	}
	offset := 0
	if v, ok := getQuery(r, "offset"); ok {
		n, err := pyInt(v)
		i, fits := bigOrInt(n)
		if err != nil || !fits {
			writeJSONResponse(w, 400, newObj("error", "offset must be an integer"))
			return
		}
		if i > 0 {
			offset = int(i)
		}
	}
	workflowID, _ := getQuery(r, "workflow_id")

	want := func(st string) bool { return filter == nil || filter[st] }
	in.mu.Lock()
	var jobs []*obj
	if want("in_progress") && in.running != nil {
		jobs = append(jobs, queueJob(in.running, "in_progress"))
	}
	if want("pending") {
		for _, it := range in.pending {
			jobs = append(jobs, queueJob(it, "pending"))
		}
	}
	for _, id := range in.history.keys {
		e := in.history.vals[id].(*obj)
		failed := historyFailed(e)
		if (failed && want("failed")) || (!failed && want("completed")) {
			jobs = append(jobs, historyJob(id, e, false))
		}
	}
	in.mu.Unlock()
	if workflowID != "" {
		kept := jobs[:0]
		for _, j := range jobs {
			if v, _ := j.get("workflow_id"); v == workflowID {
				kept = append(kept, j)
			}
		}
		jobs = kept
	}
	key := func(j *obj) float64 {
		if sortBy == "execution_duration" {
			s, okS := j.get("execution_start_time")
			e, okE := j.get("execution_end_time")
			sf, _ := pyNumber(s)
			ef, _ := pyNumber(e)
			if okS && okE && sf != 0 && ef != 0 {
				return ef - sf
			}
			return 0
		}
		c, _ := j.get("create_time")
		f, _ := pyNumber(c)
		return f
	}
	sort.SliceStable(jobs, func(a, b int) bool {
		if sortOrder == "desc" {
			return key(jobs[a]) > key(jobs[b])
		}
		return key(jobs[a]) < key(jobs[b])
	})
	total := len(jobs)
	if offset > 0 {
		jobs = jobs[min(offset, len(jobs)):]
	}
	if limitN >= 0 && limitN < len(jobs) {
		jobs = jobs[:limitN]
	}
	list := make([]any, len(jobs))
	for i, j := range jobs {
		list[i] = j
	}
	writeJSONResponse(w, 200, newObj("jobs", list, "pagination", newObj("offset", offset, "limit", limit, "total", total, "has_more", offset+len(jobs) < total)))
}

func (in *instance) getJob(w http.ResponseWriter, _ *http.Request, id string) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if e, ok := in.history.get(id); ok {
		writeJSONResponse(w, 200, historyJob(id, e.(*obj), true))
		return
	}
	if in.running != nil && in.running.promptID == id {
		writeJSONResponse(w, 200, queueJob(in.running, "in_progress"))
		return
	}
	for _, it := range in.pending {
		if it.promptID == id {
			writeJSONResponse(w, 200, queueJob(it, "pending"))
			return
		}
	}
	writeJSONResponse(w, 404, newObj("error", "Job not found"))
}

func historyFailed(e *obj) bool {
	st, _ := e.get("status")
	so, _ := st.(*obj)
	s, _ := so.get("status_str")
	return s == "error"
}

// jobMeta reads create_time and the workflow id from extra_data.
func jobMeta(extra any) (createTime any, workflowID any) {
	eo, _ := extra.(*obj)
	createTime, _ = eo.get("create_time")
	if pi, ok := eo.get("extra_pnginfo"); ok {
		if po, ok := pi.(*obj); ok {
			if wf, ok := po.get("workflow"); ok {
				if wo, ok := wf.(*obj); ok {
					workflowID, _ = wo.get("id")
				}
			}
		}
	}
	return createTime, workflowID
}

// pruned builds an object leaving out nil values (prune_dict).
func pruned(kv ...any) *obj {
	o := newObj()
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] != nil {
			o.set(kv[i].(string), kv[i+1])
		}
	}
	return o
}

func queueJob(it *queueItem, status string) *obj {
	ct, wf := jobMeta(it.extra)
	return pruned("id", it.promptID, "status", status, "priority", it.number, "create_time", ct, "outputs_count", int64(0), "workflow_id", wf)
}

func historyJob(id string, e *obj, full bool) *obj {
	pv, _ := e.get("prompt")
	tuple, _ := pv.([]any)
	var priority, prompt, extra any
	if len(tuple) >= 4 {
		priority, prompt, extra = tuple[0], tuple[2], tuple[3]
	}
	ct, wf := jobMeta(extra)
	status := "completed"
	if historyFailed(e) {
		status = "failed"
	}
	outV, _ := e.get("outputs")
	outputs, _ := outV.(*obj)
	count, previewOut := outputsSummary(outputs)
	var execErr, start, end any
	stV, _ := e.get("status")
	if so, ok := stV.(*obj); ok {
		msgs, _ := so.get("messages")
		list, _ := msgs.([]any)
		for _, m := range list {
			pair, ok := m.([]any)
			if !ok || len(pair) < 2 {
				continue
			}
			data, ok := pair[1].(*obj)
			if !ok {
				continue
			}
			switch pair[0] {
			case "execution_start":
				start, _ = data.get("timestamp")
			case "execution_success", "execution_error", "execution_interrupted":
				end, _ = data.get("timestamp")
				if pair[0] == "execution_error" {
					execErr = data
				}
			}
		}
	}
	var pv2 any
	if previewOut != nil {
		pv2 = previewOut
	}
	job := pruned("id", id, "status", status, "priority", priority, "create_time", ct, "execution_start_time", start,
		"execution_end_time", end, "execution_error", execErr, "outputs_count", int64(count), "preview_output", pv2, "workflow_id", wf)
	if full {
		if outputs == nil {
			outputs = newObj()
		}
		job.set("outputs", outputs)
		job.set("execution_status", stV)
		job.set("workflow", newObj("prompt", prompt, "extra_data", extra))
	}
	return job
}

// outputsSummary counts output items and picks the preview: the first
// previewable item of type "output", else the first previewable item.
func outputsSummary(outputs *obj) (int, *obj) {
	count := 0
	var preview, fallback *obj
	if outputs == nil {
		return 0, nil
	}
	for _, node := range outputs.keys {
		no, ok := outputs.vals[node].(*obj)
		if !ok {
			continue
		}
		for _, media := range no.keys {
			items, ok := no.vals[media].([]any)
			if media == "animated" || !ok {
				continue
			}
			for _, it := range items {
				io, ok := it.(*obj)
				if !ok {
					continue
				}
				count++
				if preview != nil || !previewable(media, io) {
					continue
				}
				enriched := io.clone()
				enriched.set("nodeId", node)
				enriched.set("mediaType", media)
				if t, _ := io.get("type"); t == "output" {
					preview = enriched
				} else if fallback == nil {
					fallback = enriched
				}
			}
		}
	}
	if preview != nil {
		return count, preview
	}
	return count, fallback
}

func previewable(media string, item *obj) bool {
	switch media {
	case "images", "video", "audio":
		return true
	}
	if f, ok := item.get("format"); ok {
		if s, ok := f.(string); ok && (strings.HasPrefix(s, "video/") || strings.HasPrefix(s, "audio/")) {
			return true
		}
	}
	if fn, ok := item.get("filename"); ok {
		if s, ok := fn.(string); ok {
			l := strings.ToLower(s)
			for _, ext := range []string{".obj", ".fbx", ".gltf", ".glb"} {
				if strings.HasSuffix(l, ext) {
					return true
				}
			}
		}
	}
	return false
}
