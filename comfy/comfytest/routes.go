package comfytest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/gorilla/websocket"
)

// The HTTP side follows ComfyUI's aiohttp routes: every route also under
// /api/ (not in the legacy generation), empty 200 bodies for the control
// routes, aiohttp's plain-text 500 when the handler raises, 413 above the body
// limit, 404 with an empty body for unknown GET paths (the static file route
// answers them) and 405 for other methods.

type routeFunc func(in *instance, w http.ResponseWriter, r *http.Request, param string)

type route struct {
	method   string
	pattern  string // "/history" or "/history/{}" (one trailing segment)
	minGen   []Generation
	handler  routeFunc
	noPrefix bool // exists only as written (the jobs API lives under /api/ only)
}

func gens(g ...Generation) []Generation { return g }

var allGens = gens(GenLegacy, GenClassic, GenCurrent)

var routes = []route{
	{method: "GET", pattern: "/ws", handler: (*instance).getWS},
	{method: "GET", pattern: "/prompt", handler: (*instance).getPrompt},
	{method: "POST", pattern: "/prompt", handler: (*instance).postPrompt},
	{method: "GET", pattern: "/queue", handler: (*instance).getQueue},
	{method: "POST", pattern: "/queue", handler: (*instance).postQueue},
	{method: "POST", pattern: "/interrupt", handler: (*instance).postInterrupt},
	{method: "GET", pattern: "/history", handler: (*instance).getHistory},
	{method: "GET", pattern: "/history/{}", handler: (*instance).getHistoryItem},
	{method: "POST", pattern: "/history", handler: (*instance).postHistory},
	{method: "GET", pattern: "/view", handler: (*instance).getView},
	{method: "POST", pattern: "/upload/image", handler: (*instance).postUploadImage},
	{method: "POST", pattern: "/upload/mask", handler: (*instance).postUploadMask},
	{method: "GET", pattern: "/system_stats", handler: (*instance).getSystemStats},
	{method: "GET", pattern: "/object_info", handler: (*instance).getObjectInfo},
	{method: "GET", pattern: "/object_info/{}", handler: (*instance).getObjectInfoClass},
	{method: "GET", pattern: "/embeddings", handler: (*instance).getEmbeddings},
	{method: "GET", pattern: "/extensions", handler: (*instance).getExtensions},
	{method: "GET", pattern: "/models", minGen: gens(GenClassic, GenCurrent), handler: (*instance).getModels},
	{method: "GET", pattern: "/models/{}", minGen: gens(GenClassic, GenCurrent), handler: (*instance).getModelFolder},
	{method: "POST", pattern: "/free", minGen: gens(GenClassic, GenCurrent), handler: (*instance).postFree},
	{method: "GET", pattern: "/features", minGen: gens(GenCurrent), handler: (*instance).getFeatures},
	{method: "GET", pattern: "/api/jobs", minGen: gens(GenCurrent), noPrefix: true, handler: (*instance).getJobs},
	{method: "GET", pattern: "/api/jobs/{}", minGen: gens(GenCurrent), noPrefix: true, handler: (*instance).getJob},
}

func (rt *route) available(g Generation) bool {
	list := rt.minGen
	if list == nil {
		list = allGens
	}
	for _, x := range list {
		if x == g {
			return true
		}
	}
	return false
}

// match reports whether p matches the pattern, and the trailing parameter.
func (rt *route) match(p string) (string, bool) {
	if base, ok := strings.CutSuffix(rt.pattern, "{}"); ok {
		rest, ok := strings.CutPrefix(p, base)
		if !ok || rest == "" || strings.Contains(rest, "/") {
			return "", false
		}
		return rest, true
	}
	return "", p == rt.pattern
}

func (in *instance) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	srv := in.srv
	if !srv.waitUnhung(r.Context().Done()) {
		return // hung: the client gives up before an answer comes
	}
	if d := time.Duration(srv.slow.Load()); d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	gen := srv.opts.Generation
	srv.opts.Logger.Debug("request", "method", r.Method, "path", r.URL.RequestURI())
	if gen != GenLegacy && !originAllowed(r) {
		w.WriteHeader(http.StatusForbidden)
		return
	}
	p := r.URL.Path
	method := r.Method
	if method == http.MethodHead {
		method = http.MethodGet
	}
	for i := range routes {
		rt := &routes[i]
		if !rt.available(gen) {
			continue
		}
		candidates := []string{p}
		if !rt.noPrefix && gen != GenLegacy {
			if rest, ok := strings.CutPrefix(p, "/api"); ok && strings.HasPrefix(rest, "/") {
				candidates = append(candidates, rest)
			}
		}
		for _, c := range candidates {
			param, ok := rt.match(c)
			if !ok {
				continue
			}
			if rt.method == method {
				rt.handler(in, w, r, param)
				return
			}
		}
	}
	if method == http.MethodGet {
		in.writeEmpty(w, http.StatusNotFound, true)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusMethodNotAllowed)
	_, _ = io.WriteString(w, "405: Method Not Allowed")
}

// originAllowed is ComfyUI's origin_only_middleware: with both Host and
// Origin present and Host on loopback, the host names must agree.
func originAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	host := strings.ToLower(r.Host)
	if origin == "" || host == "" {
		return true
	}
	ou, err := url.Parse(origin)
	if err != nil {
		return true
	}
	hu, err := url.Parse("//" + host)
	if err != nil {
		return true
	}
	hostName := hu.Hostname()
	loopback := hostName == "localhost"
	if ip := net.ParseIP(hostName); ip != nil && ip.IsLoopback() {
		loopback = true
	}
	hostDomain, originDomain := host, strings.ToLower(ou.Host)
	if ou.Port() == "" {
		hostDomain = hostName
	}
	if hu.Port() == "" {
		originDomain = strings.ToLower(ou.Hostname())
	}
	if loopback && hostDomain != "" && originDomain != "" && hostDomain != originDomain {
		return false
	}
	return true
}

func writeJSONResponse(w http.ResponseWriter, status int, v any) {
	body := pyJSON(v)
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// writeEmpty answers with no body. aiohttp 3.8 (classic, legacy) labels it
// application/octet-stream; aiohttp 3.11 (current) sends no Content-Type,
// except for unknown routes, which still say octet-stream.
func (in *instance) writeEmpty(w http.ResponseWriter, status int, unknownRoute bool) {
	if in.srv.opts.Generation != GenCurrent || unknownRoute {
		w.Header().Set("Content-Type", "application/octet-stream")
	}
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(status)
}

// writeServerError is aiohttp's answer when a handler raises.
func writeServerError(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusInternalServerError)
	_, _ = io.WriteString(w, "500 Internal Server Error\n\nServer got itself in trouble")
}

var errTooLarge = errors.New("request body too large")

// readBody reads the whole body within the upload limit; above it the 413 is
// written and errTooLarge returned.
func (in *instance) readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	max := in.srv.opts.maxBody()
	data, err := io.ReadAll(io.LimitReader(r.Body, max+1))
	if err != nil {
		writeServerError(w)
		return nil, err
	}
	if int64(len(data)) > max {
		actual := int64(len(data))
		if r.ContentLength > actual {
			actual = r.ContentLength
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusRequestEntityTooLarge)
		_, _ = fmt.Fprintf(w, "Maximum request body size %d exceeded, actual body size %d", max, actual)
		return nil, errTooLarge
	}
	return data, nil
}

// readJSON is `await request.json()`; a body that is not JSON raises (500).
func (in *instance) readJSON(w http.ResponseWriter, r *http.Request) (any, bool) {
	body, err := in.readBody(w, r)
	if err != nil {
		return nil, false
	}
	v, err := decodeJSON(body)
	if err != nil {
		writeServerError(w)
		return nil, false
	}
	return v, true
}

// getQuery is request.rel_url.query.get: the first value, and whether present.
func getQuery(r *http.Request, key string) (string, bool) {
	vals, ok := r.URL.Query()[key]
	if !ok || len(vals) == 0 {
		return "", false
	}
	return vals[0], true
}

func (in *instance) getWS(w http.ResponseWriter, r *http.Request, _ string) {
	ws, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	sid, _ := getQuery(r, "clientId")
	if sid == "" {
		sid = uuidHex()
	}
	in.mu.Lock()
	c := in.hub.register(sid, ws)
	c.enqueue(jsonFrame("status", newObj("status", in.queueInfoLocked(), "sid", sid)))
	if in.hasClient && in.clientSID == sid && in.lastNode != nil {
		c.enqueue(jsonFrame("executing", newObj("node", *in.lastNode)))
	}
	in.mu.Unlock()
	defer in.hub.unregister(c)
	first := true
	for {
		mt, data, err := ws.ReadMessage()
		if err != nil {
			return
		}
		if in.srv.opts.Generation != GenCurrent || mt != websocket.TextMessage {
			continue
		}
		v, err := decodeJSON(data)
		if err != nil {
			continue // json.JSONDecodeError is caught and logged
		}
		msg, ok := v.(*obj)
		if !ok {
			return // data.get raises: the handler ends and the socket closes
		}
		if typ, _ := msg.get("type"); first && typ == "feature_flags" {
			flags, _ := msg.get("data")
			fo, ok := flags.(*obj)
			if !ok {
				fo = newObj()
			}
			c.mu.Lock()
			c.flags = fo
			c.mu.Unlock()
			in.hub.send(sid, false, jsonFrame("feature_flags", in.serverFeatures()))
		}
		first = false
	}
}

func (in *instance) serverFeatures() *obj {
	return newObj("supports_preview_metadata", true, "max_upload_size", in.srv.opts.maxBody(),
		"extension", newObj("manager", newObj("supports_v4", true)))
}

func (in *instance) getFeatures(w http.ResponseWriter, _ *http.Request, _ string) {
	writeJSONResponse(w, 200, in.serverFeatures())
}

func (in *instance) getPrompt(w http.ResponseWriter, _ *http.Request, _ string) {
	in.mu.Lock()
	info := in.queueInfoLocked()
	in.mu.Unlock()
	writeJSONResponse(w, 200, info)
}

func (in *instance) postPrompt(w http.ResponseWriter, r *http.Request, _ string) {
	data, ok := in.readJSON(w, r)
	if !ok {
		return
	}
	in.promptMu.Lock()
	defer in.promptMu.Unlock()
	status, body, exc := in.submit(data)
	if exc != nil {
		in.srv.opts.Logger.Debug("POST /prompt raised", "error", exc.Error())
		writeServerError(w)
		return
	}
	writeJSONResponse(w, status, body)
}

// submit is post_prompt after the body is parsed: priority, validation,
// enqueue. A *pyErr is an exception escaping the handler.
func (in *instance) submit(data any) (int, any, *pyErr) {
	gen := in.srv.opts.Generation
	hasNumber, err := pyContains(data, "number")
	if err != nil {
		return 0, nil, err
	}
	var number any
	var numF float64
	if hasNumber {
		nv, err := pyGetItem(data, "number")
		if err != nil {
			return 0, nil, err
		}
		f, perr := pyFloat(nv)
		if perr != nil {
			return 0, nil, perr
		}
		number, numF = f, f
	} else {
		in.mu.Lock()
		n := in.number
		in.number++
		in.mu.Unlock()
		number, numF = n, float64(n)
		if hasFront, _ := pyContains(data, "front"); hasFront {
			fv, err := pyGetItem(data, "front")
			if err != nil {
				return 0, nil, err
			}
			if pyTruthy(fv) {
				number, numF = -n, float64(-n)
			}
		}
	}
	hasPrompt, _ := pyContains(data, "prompt")
	if !hasPrompt {
		if gen == GenCurrent {
			return 400, newObj("error", errBody("no_prompt", "No prompt provided", "No prompt provided", nil), "node_errors", newObj()), nil
		}
		return 400, newObj("error", "no prompt", "node_errors", []any{}), nil
	}
	prompt, err := pyGetItem(data, "prompt")
	if err != nil {
		return 0, nil, err
	}
	promptID := uuid4()
	var targets any
	if gen == GenCurrent {
		do := data.(*obj)
		if v, ok := do.get("prompt_id"); ok {
			promptID = pyStr(v)
		}
		targets, _ = do.get("partial_execution_targets")
	}
	check, exc := in.validatePrompt(prompt, targets)
	if exc != nil {
		return 0, nil, exc
	}
	var extra any = newObj()
	if has, _ := pyContains(data, "extra_data"); has {
		extra, _ = pyGetItem(data, "extra_data")
	}
	if has, _ := pyContains(data, "client_id"); has {
		cid, _ := pyGetItem(data, "client_id")
		eo, ok := extra.(*obj)
		if !ok {
			return 0, nil, &pyErr{Type: "TypeError", Msg: fmt.Sprintf("'%s' object does not support item assignment", pyTypeName(extra))}
		}
		eo.set("client_id", cid)
	}
	if !check.ok {
		return 400, newObj("error", check.err, "node_errors", check.nodeErrors), nil
	}
	if gen == GenCurrent {
		eo, ok := extra.(*obj)
		if !ok {
			return 0, nil, &pyErr{Type: "AttributeError", Msg: fmt.Sprintf("'%s' object has no attribute 'pop'", pyTypeName(extra))}
		}
		eo.del("api_key_comfy_org")
		eo.del("auth_token_comfy_org")
		in.srv.tick()
		eo.set("create_time", in.srv.nowMS())
	}
	po := prompt.(*obj)
	in.mu.Lock()
	in.seq++
	in.pending.push(&queueItem{number: number, numF: numF, promptID: promptID, prompt: po, extra: extra, outputs: check.outputs, seq: in.seq})
	in.submitted++
	in.broadcastStatusLocked()
	in.cond.Broadcast()
	in.mu.Unlock()
	return 200, newObj("prompt_id", promptID, "number", number, "node_errors", check.nodeErrors), nil
}

func (in *instance) getQueue(w http.ResponseWriter, _ *http.Request, _ string) {
	in.mu.Lock()
	running := []any{}
	if in.running != nil {
		running = append(running, in.running.tuple())
	}
	pending := []any{}
	for _, it := range in.pending {
		pending = append(pending, it.tuple())
	}
	in.mu.Unlock()
	writeJSONResponse(w, 200, newObj("queue_running", running, "queue_pending", pending))
}

// iterate is Python's `for x in v` over a JSON value.
func iterate(v any) ([]any, *pyErr) {
	switch t := v.(type) {
	case []any:
		return t, nil
	case *obj:
		out := make([]any, len(t.keys))
		for i, k := range t.keys {
			out[i] = k
		}
		return out, nil
	case string:
		var out []any
		for _, r := range t {
			out = append(out, string(r))
		}
		return out, nil
	}
	return nil, &pyErr{Type: "TypeError", Msg: fmt.Sprintf("'%s' object is not iterable", pyTypeName(v))}
}

func (in *instance) postQueue(w http.ResponseWriter, r *http.Request, _ string) {
	data, ok := in.readJSON(w, r)
	if !ok {
		return
	}
	if has, err := pyContains(data, "clear"); err != nil {
		writeServerError(w)
		return
	} else if has {
		v, _ := pyGetItem(data, "clear")
		if pyTruthy(v) {
			in.mu.Lock()
			in.pending = nil
			in.broadcastStatusLocked()
			in.mu.Unlock()
		}
	}
	if has, _ := pyContains(data, "delete"); has {
		v, _ := pyGetItem(data, "delete")
		ids, err := iterate(v)
		if err != nil {
			writeServerError(w)
			return
		}
		in.mu.Lock()
		for _, id := range ids {
			for i, it := range in.pending {
				if !pyEqual(it.promptID, id) {
					continue
				}
				if len(in.pending) == 1 {
					in.pending = nil
					in.broadcastStatusLocked()
				} else {
					in.pending = append(in.pending[:i:i], in.pending[i+1:]...)
					in.pending.heapify()
				}
				in.broadcastStatusLocked()
				break
			}
		}
		in.mu.Unlock()
	}
	in.writeEmpty(w, 200, false)
}

func (in *instance) postInterrupt(w http.ResponseWriter, r *http.Request, _ string) {
	if in.srv.opts.Generation != GenCurrent {
		in.mu.Lock()
		in.interrupted = true
		in.mu.Unlock()
		in.writeEmpty(w, 200, false)
		return
	}
	body, err := in.readBody(w, r)
	if err != nil {
		return
	}
	var data any = newObj()
	if v, err := decodeJSON(body); err == nil {
		data = v
	}
	do, ok := data.(*obj)
	if !ok {
		writeServerError(w)
		return
	}
	pid, _ := do.get("prompt_id")
	in.mu.Lock()
	if pyTruthy(pid) {
		if in.running != nil && pyEqual(in.running.promptID, pid) {
			in.interrupted = true
		}
	} else {
		in.interrupted = true
	}
	in.mu.Unlock()
	in.writeEmpty(w, 200, false)
}

func (in *instance) postFree(w http.ResponseWriter, r *http.Request, _ string) {
	data, ok := in.readJSON(w, r)
	if !ok {
		return
	}
	do, isObj := data.(*obj)
	if !isObj {
		writeServerError(w)
		return
	}
	unload, _ := do.get("unload_models")
	free, _ := do.get("free_memory")
	in.mu.Lock()
	if pyTruthy(unload) {
		in.flagUnload = true
	}
	if pyTruthy(free) {
		in.flagFree = true
	}
	in.cond.Broadcast()
	in.mu.Unlock()
	in.writeEmpty(w, 200, false)
}

func (in *instance) getHistory(w http.ResponseWriter, r *http.Request, _ string) {
	maxItems := -1
	hasMax := false
	if s, ok := getQuery(r, "max_items"); ok {
		v, err := pyInt(s)
		n, fits := bigOrInt(v)
		if err != nil || !fits {
			writeServerError(w)
			return
		}
		maxItems, hasMax = int(n), true
	}
	offset := -1
	if s, ok := getQuery(r, "offset"); ok && in.srv.opts.Generation == GenCurrent {
		v, err := pyInt(s)
		n, fits := bigOrInt(v)
		if err != nil || !fits {
			writeServerError(w)
			return
		}
		offset = int(n)
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	h := in.history
	out := newObj()
	if offset < 0 && hasMax {
		offset = h.len() - maxItems
	}
	for i, k := range h.keys {
		if i >= offset {
			out.set(k, h.vals[k])
			if hasMax && out.len() >= maxItems {
				break
			}
		}
	}
	writeJSONResponse(w, 200, out)
}

func (in *instance) getHistoryItem(w http.ResponseWriter, _ *http.Request, id string) {
	in.mu.Lock()
	defer in.mu.Unlock()
	out := newObj()
	if e, ok := in.history.get(id); ok {
		out.set(id, e)
	}
	writeJSONResponse(w, 200, out)
}

func (in *instance) postHistory(w http.ResponseWriter, r *http.Request, _ string) {
	data, ok := in.readJSON(w, r)
	if !ok {
		return
	}
	if has, err := pyContains(data, "clear"); err != nil {
		writeServerError(w)
		return
	} else if has {
		if v, _ := pyGetItem(data, "clear"); pyTruthy(v) {
			in.mu.Lock()
			in.history = newObj()
			in.mu.Unlock()
		}
	}
	if has, _ := pyContains(data, "delete"); has {
		v, _ := pyGetItem(data, "delete")
		ids, err := iterate(v)
		if err != nil {
			writeServerError(w)
			return
		}
		in.mu.Lock()
		for _, id := range ids {
			if s, ok := id.(string); ok {
				in.history.del(s)
			}
		}
		in.mu.Unlock()
	}
	in.writeEmpty(w, 200, false)
}

// folderFor is folder_paths.get_directory_by_type.
func folderFor(typ string) (string, bool) {
	switch typ {
	case kindOutput, kindInput, kindTemp:
		return typ, true
	}
	return "", false
}

func (in *instance) getView(w http.ResponseWriter, r *http.Request, _ string) {
	filename, ok := getQuery(r, "filename")
	if !ok {
		in.writeEmpty(w, 404, false)
		return
	}
	gen := in.srv.opts.Generation
	kind, name := splitAnnotation(filename, "")
	if name == "" {
		if gen == GenCurrent {
			in.writeEmpty(w, 400, false)
		} else {
			writeServerError(w) // filename[0] raises IndexError
		}
		return
	}
	if name[0] == '/' || strings.Contains(name, "..") {
		in.writeEmpty(w, 400, false)
		return
	}
	if kind == "" {
		typ, ok := getQuery(r, "type")
		if !ok {
			typ = kindOutput
		}
		if kind, ok = folderFor(typ); !ok {
			in.writeEmpty(w, 400, false)
			return
		}
	}
	dir := ""
	if sub, ok := getQuery(r, "subfolder"); ok {
		clean, inside := joinRel(sub)
		if !inside {
			in.writeEmpty(w, 403, false)
			return
		}
		dir = clean
	}
	base := path.Base(name)
	if strings.HasSuffix(name, "/") {
		base = ""
	}
	rel, _ := joinRel(dir, base)
	f, ok := in.srv.files.read(kind, rel)
	if !ok || base == "" {
		in.writeEmpty(w, 404, false)
		return
	}
	data := f.data
	ctype := mime.TypeByExtension(path.Ext(base))
	if ctype == "" || strings.HasPrefix(ctype, "text/html") || strings.HasPrefix(ctype, "text/javascript") || strings.HasPrefix(ctype, "text/css") {
		ctype = "application/octet-stream"
	}
	disposition := fmt.Sprintf("filename=%q", base)
	if pv, ok := getQuery(r, "preview"); ok {
		parts := strings.Split(pv, ";")
		quality := 90
		if q, err := strconv.Atoi(parts[len(parts)-1]); err == nil {
			quality = q
		}
		// Only JPEG can be produced with the standard library; a webp preview
		// is answered with the JPEG re-encoding.
		out, err := reencodeJPEG(data, quality)
		if err != nil {
			writeServerError(w)
			return
		}
		w.Header().Set("Content-Disposition", fmt.Sprintf("filename=%q", strings.ReplaceAll(base, "png", "jpeg")))
		w.Header().Set("Content-Type", "image/jpeg")
		_, _ = w.Write(out)
		return
	}
	if ch, ok := getQuery(r, "channel"); ok && (ch == "rgb" || ch == "a") {
		out, err := reencodePNG(data, ch)
		if err != nil {
			writeServerError(w)
			return
		}
		w.Header().Set("Content-Disposition", disposition)
		w.Header().Set("Content-Type", "image/png")
		_, _ = w.Write(out)
		return
	}
	w.Header().Set("Content-Disposition", disposition)
	w.Header().Set("Content-Type", ctype)
	http.ServeContent(w, r, base, f.mod, bytes.NewReader(data))
}

// formPart is one field of a multipart upload.
type formPart struct {
	isFile   bool
	filename string
	data     []byte
}

// parseForm is aiohttp's request.post(): multipart or urlencoded fields.
func (in *instance) parseForm(w http.ResponseWriter, r *http.Request) (map[string]formPart, bool) {
	body, err := in.readBody(w, r)
	if err != nil {
		return nil, false
	}
	fields := map[string]formPart{}
	mt, params, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	switch mt {
	case "multipart/form-data":
		mr := multipart.NewReader(bytes.NewReader(body), params["boundary"])
		for {
			p, err := mr.NextPart()
			if err == io.EOF {
				break
			}
			if err != nil {
				writeServerError(w)
				return nil, false
			}
			data, err := io.ReadAll(p)
			if err != nil {
				writeServerError(w)
				return nil, false
			}
			name := p.FormName()
			if _, dup := fields[name]; dup {
				continue // MultiDict.get returns the first value
			}
			fields[name] = formPart{isFile: p.FileName() != "" || p.Header.Get("Content-Type") == "application/octet-stream", filename: p.FileName(), data: data}
		}
	case "application/x-www-form-urlencoded":
		vals, err := url.ParseQuery(string(body))
		if err != nil {
			writeServerError(w)
			return nil, false
		}
		for k, v := range vals {
			fields[k] = formPart{data: []byte(v[0])}
		}
	}
	return fields, true
}

func (in *instance) postUploadImage(w http.ResponseWriter, r *http.Request, _ string) {
	fields, ok := in.parseForm(w, r)
	if !ok {
		return
	}
	in.upload(w, fields, nil)
}

// upload is image_upload: pick the folder, refuse paths that escape it, and
// without overwrite keep the existing name for identical bytes or find a free
// "name (i).ext".
func (in *instance) upload(w http.ResponseWriter, fields map[string]formPart, transform func(path string, data []byte) ([]byte, bool)) {
	image, hasImage := fields["image"]
	kind := kindInput
	if t, ok := fields["type"]; ok {
		k, known := folderFor(string(t.data))
		if !known {
			writeServerError(w) // type_dir is never bound: UnboundLocalError
			return
		}
		kind = k
	}
	if !hasImage {
		in.writeEmpty(w, 400, false)
		return
	}
	if !image.isFile {
		writeServerError(w) // a plain field has no .file
		return
	}
	filename := image.filename
	if filename == "" {
		in.writeEmpty(w, 400, false)
		return
	}
	subfolder := ""
	if s, ok := fields["subfolder"]; ok {
		subfolder = string(s.data)
	}
	folder, ok := joinRel(subfolder)
	if !ok {
		in.writeEmpty(w, 400, false)
		return
	}
	rel, ok := joinRel(folder, filename)
	if !ok || rel == folder {
		in.writeEmpty(w, 400, false)
		return
	}
	overwrite := false
	if o, ok := fields["overwrite"]; ok {
		overwrite = string(o.data) == "true" || string(o.data) == "1"
	}
	data := image.data
	duplicate := false
	if !overwrite {
		stem, ext := splitext(filename)
		for i := 1; in.srv.files.exists(kind, rel); i++ {
			if in.srv.opts.Generation != GenLegacy {
				if f, _ := in.srv.files.read(kind, rel); bytes.Equal(f.data, data) {
					duplicate = true
					break
				}
			}
			filename = fmt.Sprintf("%s (%d)%s", stem, i, ext)
			rel, _ = joinRel(folder, filename)
		}
	}
	if !duplicate {
		if transform != nil {
			out, ok := transform(rel, data)
			if !ok {
				writeServerError(w)
				return
			}
			data = out
		}
		in.srv.files.put(kind, rel, data)
	}
	writeJSONResponse(w, 200, newObj("name", filename, "subfolder", subfolder, "type", kind))
}

func (in *instance) postUploadMask(w http.ResponseWriter, r *http.Request, _ string) {
	fields, ok := in.parseForm(w, r)
	if !ok {
		return
	}
	ref, hasRef := fields["original_ref"]
	var refObj *obj
	if hasRef {
		v, err := decodeJSON(ref.data)
		if err == nil {
			refObj, _ = v.(*obj)
		}
	}
	if _, hasImage := fields["image"]; hasImage && refObj == nil {
		writeServerError(w)
		return
	}
	in.upload(w, fields, func(_ string, mask []byte) ([]byte, bool) {
		fn, _ := refObj.get("filename")
		name, _ := fn.(string)
		kind, rel := splitAnnotation(name, "")
		if kind == "" {
			t, ok := refObj.get("type")
			ts, _ := t.(string)
			if !ok {
				ts = kindOutput
			}
			kind = ts
		}
		sub, _ := refObj.get("subfolder")
		subs, _ := sub.(string)
		p, ok := joinRel(subs, rel)
		if !ok {
			return nil, false
		}
		base, ok := in.srv.files.read(kind, p)
		if !ok {
			return mask, true // ComfyUI writes nothing when the original is missing
		}
		out, err := applyMask(base.data, mask)
		return out, err == nil
	})
}

func (in *instance) getSystemStats(w http.ResponseWriter, _ *http.Request, _ string) {
	o := in.srv.opts
	port := ""
	if _, p, err := net.SplitHostPort(in.ln.Addr().String()); err == nil {
		port = p
	}
	in.mu.Lock()
	used := int64(len(in.loaded)) * (2 << 30)
	in.mu.Unlock()
	free := o.VRAM - used
	if free < 0 {
		free = 0
	}
	device := newObj("name", o.DeviceName, "type", "cuda", "index", int64(0), "vram_total", o.VRAM, "vram_free", free,
		"torch_vram_total", o.VRAM, "torch_vram_free", free)
	ram := int64(64 << 30)
	argv := []any{"main.py", "--listen", "127.0.0.1", "--port", port}
	var system *obj
	switch o.Generation {
	case GenCurrent:
		system = newObj("os", "linux", "ram_total", ram, "ram_free", ram/2, "comfyui_version", "0.8.0",
			"required_frontend_version", "1.35.9", "installed_templates_version", "0.7.67", "required_templates_version", "0.7.67",
			"python_version", "3.12.3 (main, Nov  6 2025, 13:44:16) [GCC 13.3.0]", "pytorch_version", "2.9.1+cu128",
			"embedded_python", false, "argv", argv)
	case GenClassic:
		system = newObj("os", "posix", "ram_total", ram, "ram_free", ram/2, "comfyui_version", "v0.3.10",
			"python_version", "3.11.2 (main, Apr 28 2025, 14:11:48) [GCC 12.2.0]", "pytorch_version", "2.5.1+cu124",
			"embedded_python", false, "argv", argv)
	default:
		system = newObj("os", "posix", "python_version", "3.10.12 (main, Jun 11 2023, 05:26:28) [GCC 11.4.0]", "embedded_python", false)
	}
	writeJSONResponse(w, 200, newObj("system", system, "devices", []any{device}))
}

func (in *instance) getObjectInfo(w http.ResponseWriter, _ *http.Request, _ string) {
	out := newObj()
	for _, name := range in.srv.cat.order {
		out.set(name, in.srv.cat.get(name).objectInfo(in))
	}
	writeJSONResponse(w, 200, out)
}

func (in *instance) getObjectInfoClass(w http.ResponseWriter, _ *http.Request, class string) {
	out := newObj()
	if c := in.srv.cat.get(class); c != nil {
		out.set(class, c.objectInfo(in))
	}
	writeJSONResponse(w, 200, out)
}

func (in *instance) getEmbeddings(w http.ResponseWriter, _ *http.Request, _ string) {
	writeJSONResponse(w, 200, []any{})
}

func (in *instance) getExtensions(w http.ResponseWriter, _ *http.Request, _ string) {
	if in.srv.opts.Generation == GenCurrent {
		writeJSONResponse(w, 200, []any{})
		return
	}
	writeJSONResponse(w, 200, []any{"/extensions/core/groupNode.js", "/extensions/core/maskEditorOld.js", "/extensions/core/clipspace.js",
		"/extensions/core/colorPalette.js", "/extensions/core/widgetInputs.js", "/extensions/core/groupNodeManage.js", "/extensions/core/vintageClipboard.js"})
}

var modelFolders = []string{"checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
	"style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen", "upscale_models", "custom_nodes",
	"hypernetworks", "photomaker", "classifiers"}

func (in *instance) getModels(w http.ResponseWriter, _ *http.Request, _ string) {
	writeJSONResponse(w, 200, sortedAnyKeep(modelFolders))
}

func (in *instance) getModelFolder(w http.ResponseWriter, _ *http.Request, folder string) {
	switch folder {
	case "checkpoints":
		writeJSONResponse(w, 200, sortedAny(in.srv.Checkpoints()))
		return
	case "loras":
		writeJSONResponse(w, 200, sortedAny(in.srv.Loras()))
		return
	}
	for _, f := range modelFolders {
		if f == folder {
			writeJSONResponse(w, 200, []any{})
			return
		}
	}
	in.writeEmpty(w, 404, false)
}

func sortedAnyKeep(list []string) []any {
	out := make([]any, len(list))
	for i, v := range list {
		out[i] = v
	}
	return out
}
