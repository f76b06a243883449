package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// The ComfyUI-compatible API (DESIGN §8) lets an existing ComfyUI API client
// use the farm by its base address: /comfy (frontend key in Authorization;
// jobs of user "comfy") or /comfy/u/{token} (a token naming frontend and
// user). Prompts become jobs of that user, so they are queued, spread over
// the nodes, survive restarts and end as stored photos; the ComfyUI routes
// read those jobs back in ComfyUI's shapes.

// ComfyCatalogue is what the ComfyUI-compatible API needs from the farm's
// nodes for /object_info and /system_stats. The JobService or NodeService
// may implement it; without it those routes answer 503.
type ComfyCatalogue interface {
	// ObjectInfo is the union of the up nodes' object_info.
	ObjectInfo(ctx context.Context) (map[string]json.RawMessage, error)
	// SystemStats is an up node's system_stats.
	SystemStats(ctx context.Context) (json.RawMessage, error)
}

// comfyDefaultUser owns the jobs of requests made with a bare frontend key.
const comfyDefaultUser = "comfy"

// Bounds of the ComfyUI-compatible API.
const (
	comfyCatalogueTTL = 30 * time.Second // object_info union kept this long
	comfyListLimit    = 100              // jobs read for /queue, /history and prompt look-ups
	maxComfyPrompts   = 10000            // client-chosen prompt ids remembered in memory
	maxClientIDBytes  = 128
	maxPromptIDBytes  = 64
)

// comfyWho is who a /comfy request acts as.
type comfyWho struct {
	frontend string
	user     string
	key      int    // keyring index charged for rate limits and streams
	token    string // set when authorised by a path token
}

const localComfyWho = "comfyfarm.comfy"

func comfyWhoOf(c *fiber.Ctx) comfyWho {
	w, _ := c.Locals(localComfyWho).(comfyWho)
	return w
}

// comfyAPI holds the state of the ComfyUI-compatible routes.
type comfyAPI struct {
	s       *Server
	upgrade fiber.Handler
	number  atomic.Int64 // the "number" of POST /prompt answers

	mu       sync.Mutex
	sessions map[sessionKey]map[*comfySession]bool
	prompts  map[promptKey]string // client-chosen prompt id -> job id
	order    []promptKey          // prompts' keys, oldest first

	catMu sync.Mutex
	cat   map[string]json.RawMessage
	catAt time.Time
}

type sessionKey struct{ frontend, user, clientID string }

type promptKey struct{ frontend, user, promptID string }

// comfyRoutes registers the ComfyUI-compatible API and its token route.
func (s *Server) comfyRoutes() {
	a := &comfyAPI{s: s, sessions: map[sessionKey]map[*comfySession]bool{}, prompts: map[promptKey]string{}}
	a.upgrade = a.newUpgrader()
	s.app.Post("/api/v1/comfy/tokens", s.authenticate, a.tokenMint)
	// Newer ComfyUI clients put /api before every route; both forms work.
	for _, p := range []string{"/comfy", "/comfy/api", "/comfy/u/:token", "/comfy/u/:token/api"} {
		s.app.Post(p+"/prompt", a.auth, a.prompt)
		s.app.Get(p+"/prompt", a.auth, a.promptInfo)
		s.app.Get(p+"/history", a.auth, a.historyAll)
		s.app.Get(p+"/history/:prompt_id", a.auth, a.historyOne)
		s.app.Get(p+"/view", a.auth, a.view)
		s.app.Get(p+"/queue", a.auth, a.queue)
		s.app.Post(p+"/queue", a.auth, a.queueEdit)
		s.app.Post(p+"/interrupt", a.auth, a.interrupt)
		s.app.Get(p+"/object_info", a.auth, a.objectInfo)
		s.app.Get(p+"/object_info/:class", a.auth, a.objectInfo)
		s.app.Get(p+"/system_stats", a.auth, a.systemStats)
		s.app.Get(p+"/ws", a.auth, a.ws)
		s.app.Post(p+"/upload/image", a.auth, a.upload)
		s.app.Get(p+"/features", a.auth, a.features)
	}
}

// auth authorises a /comfy request: a path token, or a frontend key (the
// admin key acts for no one user, so it is refused). It charges the rate
// limit of the key, or of the token's frontend's first key.
func (a *comfyAPI) auth(c *fiber.Ctx) error {
	s := a.s
	var who comfyWho
	if tok := c.Params("token"); tok != "" {
		frontend, user, err := s.tokens.checkComfy(tok)
		if err != nil {
			if errors.Is(err, errTokenExpired) {
				return newAPIError(http.StatusUnauthorized, "token_expired", "the ComfyUI API token has expired")
			}
			return newAPIError(http.StatusUnauthorized, "invalid_token", "the ComfyUI API token is not valid")
		}
		key, ok := s.keys.firstOf(frontend)
		if !ok {
			return newAPIError(http.StatusForbidden, "forbidden", "the token's frontend has no api key any more")
		}
		who = comfyWho{frontend: frontend, user: user, key: key, token: tok}
	} else {
		p, err := s.principal(c)
		if err != nil {
			return err
		}
		if p.admin {
			return newAPIError(http.StatusForbidden, "forbidden",
				"the ComfyUI API takes a frontend key, or a token from POST /api/v1/comfy/tokens")
		}
		who = comfyWho{frontend: p.frontend, user: comfyDefaultUser, key: p.key}
	}
	if _, err := s.deps.Frontends.Get(who.frontend); err != nil {
		if errors.Is(err, schema.ErrUnknownFrontend) {
			return newAPIError(http.StatusForbidden, "forbidden", "unknown frontend "+who.frontend)
		}
		return err
	}
	if err := s.limit(c, principal{frontend: who.frontend, key: who.key}, limitRequests); err != nil {
		return err
	}
	c.Locals(localComfyWho, who)
	return c.Next()
}

// firstOf returns the keyring index of frontend's first key.
func (k *keyring) firstOf(frontend string) (int, bool) {
	for i, e := range k.entries {
		if !e.who.admin && e.who.frontend == frontend {
			return i, true
		}
	}
	return 0, false
}

// tokenRequest is the body of POST /api/v1/comfy/tokens. TTL is a duration
// ("24h") or a number of seconds.
type tokenRequest struct {
	Frontend string          `json:"frontend"`
	UserID   string          `json:"user_id"`
	TTL      json.RawMessage `json:"ttl"`
}

type tokenResponse struct {
	Token     string    `json:"token"`
	BaseURL   string    `json:"base_url"`
	ExpiresAt time.Time `json:"expires_at"`
}

// tokenMint serves POST /api/v1/comfy/tokens.
func (a *comfyAPI) tokenMint(c *fiber.Ctx) error {
	var b tokenRequest
	if err := decodeJSON(c, &b); err != nil {
		return err
	}
	if err := checkUserID("user_id", b.UserID); err != nil {
		return err
	}
	ttl, err := parseTTL(b.TTL)
	if err != nil {
		return err
	}
	frontend, err := a.s.frontendName(c, b.Frontend)
	if err != nil {
		return err
	}
	exp := a.s.cfg.NowFunc().Add(ttl).UTC().Truncate(time.Second)
	tok := a.s.tokens.mintComfy(frontend, b.UserID, exp)
	base := strings.TrimRight(a.s.cfg.PublicURL, "/")
	if base == "" {
		base = c.BaseURL()
	}
	return c.Status(http.StatusCreated).JSON(tokenResponse{
		Token: tok, BaseURL: base + "/comfy/u/" + tok, ExpiresAt: exp,
	})
}

func parseTTL(raw json.RawMessage) (time.Duration, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return defaultComfyTokenTTL, nil
	}
	var d time.Duration
	var str string
	var secs float64
	switch {
	case json.Unmarshal(raw, &str) == nil:
		v, err := time.ParseDuration(str)
		if err != nil {
			return 0, schema.Invalid("ttl", "not a duration (e.g. \"24h\") or a number of seconds")
		}
		d = v
	case json.Unmarshal(raw, &secs) == nil:
		if secs > maxComfyTokenTTL.Seconds() {
			return 0, schema.Invalid("ttl", "at most %s", maxComfyTokenTTL)
		}
		d = time.Duration(secs * float64(time.Second))
	default:
		return 0, schema.Invalid("ttl", "not a duration (e.g. \"24h\") or a number of seconds")
	}
	if d < time.Second || d > maxComfyTokenTTL {
		return 0, schema.Invalid("ttl", "must be between 1s and %s", maxComfyTokenTTL)
	}
	return d, nil
}

// comfyMeta is what a job submitted through /comfy keeps in its metadata.
type comfyMeta struct {
	Comfy struct {
		ClientID string `json:"client_id,omitempty"`
		PromptID string `json:"prompt_id,omitempty"`
	} `json:"comfy"`
}

func metaOf(j *schema.Job) comfyMeta {
	var m comfyMeta
	if len(j.Metadata) > 0 {
		_ = json.Unmarshal(j.Metadata, &m)
	}
	return m
}

// promptIDOf is the id a ComfyUI client knows the job by.
func promptIDOf(j *schema.Job) string {
	if p := metaOf(j).Comfy.PromptID; p != "" {
		return p
	}
	return j.ID
}

// prompt serves POST /prompt.
func (a *comfyAPI) prompt(c *fiber.Ctx) error {
	jobs, err := a.s.jobService()
	if err != nil {
		return err
	}
	who := comfyWhoOf(c)
	// A prompt is a submission: limits.submit_per_minute applies too.
	if err := a.s.limit(c, principal{frontend: who.frontend, key: who.key}, limitSubmits); err != nil {
		return err
	}
	// A prompt is a raw workflow: a templates-only frontend may not send one
	// here either.
	if allowed, ok := a.s.cfg.RawWorkflows[who.frontend]; ok && !allowed {
		return newAPIError(http.StatusForbidden, "raw_workflows_disabled",
			"this frontend submits templates only: use POST /api/v1/jobs with template and inputs").
			with("frontend", who.frontend)
	}
	p, perr := decodeComfyPrompt(c.Body())
	if perr != nil {
		return c.Status(http.StatusBadRequest).JSON(perr)
	}
	var meta comfyMeta
	meta.Comfy.ClientID, meta.Comfy.PromptID = p.ClientID, p.PromptID
	metaJSON, err := json.Marshal(meta)
	if err != nil {
		return err
	}
	inputs, err := a.uploadedInputs(c.UserContext(), who, p)
	if err != nil {
		return a.submitError(c, p, err)
	}
	params := schema.SubmitParams{
		Frontend: who.frontend, UserID: who.user, Workflow: p.Prompt, Metadata: metaJSON, Inputs: inputs,
	}
	if p.PromptID != "" {
		// A retried POST with the same prompt id is the same job.
		sum := sha256.Sum256([]byte(who.user + "\x00" + p.PromptID))
		params.IdempotencyKey = "comfy:" + hex.EncodeToString(sum[:20])
	}
	job, err := jobs.Submit(c.UserContext(), params)
	if err != nil {
		return a.submitError(c, p, err)
	}
	pid := job.ID
	if p.PromptID != "" {
		pid = p.PromptID
		a.remember(promptKey{who.frontend, who.user, pid}, job.ID)
	}
	if p.ClientID != "" {
		a.notify(sessionKey{who.frontend, who.user, p.ClientID}, job.ID, pid)
	}
	return c.JSON(fiber.Map{"prompt_id": pid, "number": a.number.Add(1) - 1, "node_errors": fiber.Map{}})
}

// submitError answers a refused submission in ComfyUI's error shape.
func (a *comfyAPI) submitError(c *fiber.Ctx, p *comfyPrompt, err error) error {
	var ve *schema.ValidationError
	if errors.As(err, &ve) {
		return c.Status(http.StatusBadRequest).JSON(validationToComfy(p, ve))
	}
	if errors.Is(err, schema.ErrNoNode) {
		if missing := reasonAfter(err, schema.ErrNoNode); missing != "" {
			if _, list, ok := strings.Cut(missing, "lacks "); ok {
				class := strings.TrimSpace(strings.Split(list, ",")[0])
				return c.Status(http.StatusBadRequest).JSON(comfyInvalidPrompt(
					"Cannot execute because node "+class+" does not exist.", "Node ID '#"+p.nodeOf(class)+"'"))
			}
		}
	}
	ae := classify(err)
	if ae.Status >= 500 {
		return err // logged and answered by the error handler
	}
	c.Set(fiber.HeaderCacheControl, "no-store")
	extra := ae.Details
	if extra == nil {
		extra = map[string]any{}
	}
	return c.Status(ae.Status).JSON(comfyErrorBody{
		Error:      comfyError{Type: ae.Code, Message: ae.Message, Details: "", ExtraInfo: extra},
		NodeErrors: map[string]comfyNodeError{},
	})
}

// validationToComfy turns the farm's graph validation error into ComfyUI's
// 400 body: a node's problem goes to node_errors.
func validationToComfy(p *comfyPrompt, ve *schema.ValidationError) comfyErrorBody {
	rest, ok := strings.CutPrefix(ve.Field, "workflow")
	if !ok {
		return comfyInvalidPrompt(ve.Error(), ve.Field)
	}
	if strings.Contains(ve.Reason, "no output node") {
		b := comfyInvalidPrompt("Prompt has no outputs", "")
		b.Error.Type = "prompt_no_outputs"
		return b
	}
	node, input, _ := strings.Cut(strings.TrimPrefix(rest, "."), ".")
	if node == "" {
		return comfyInvalidPrompt(ve.Reason, "")
	}
	ne := comfyNodeError{ClassType: p.classOf(node), DependentOutputs: []string{}}
	extra := map[string]any{}
	if input != "" {
		extra["input_name"] = input
	}
	ne.Errors = append(ne.Errors, comfyError{Type: "invalid_input", Message: ve.Reason,
		Details: strings.TrimPrefix(input+": "+ve.Reason, ": "), ExtraInfo: extra})
	return comfyErrorBody{
		Error: comfyError{Type: "prompt_outputs_failed_validation", Message: "Prompt outputs failed validation",
			Details: ve.Reason, ExtraInfo: map[string]any{}},
		NodeErrors: map[string]comfyNodeError{node: ne},
	}
}

// remember keeps a client-chosen prompt id's job, forgetting the oldest past
// maxComfyPrompts (the job's metadata still finds it, more slowly).
func (a *comfyAPI) remember(k promptKey, jobID string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.prompts[k]; !ok {
		a.order = append(a.order, k)
	}
	a.prompts[k] = jobID
	for len(a.order) > maxComfyPrompts {
		delete(a.prompts, a.order[0])
		a.order = a.order[1:]
	}
}

// jobOf finds the caller's job of a prompt id: a remembered client-chosen
// id, a job id, or a client-chosen id in the metadata of the user's recent
// jobs. schema.ErrNotFound when it is none of the user's.
func (a *comfyAPI) jobOf(ctx context.Context, who comfyWho, pid string) (*schema.Job, error) {
	jobs, err := a.s.jobService()
	if err != nil {
		return nil, err
	}
	if pid == "" || len(pid) > maxPromptIDBytes {
		return nil, schema.ErrNotFound
	}
	a.mu.Lock()
	id, ok := a.prompts[promptKey{who.frontend, who.user, pid}]
	a.mu.Unlock()
	if !ok && checkJobID("prompt_id", pid, false) == nil {
		id = pid
	}
	if id != "" {
		j, err := jobs.Job(ctx, who.frontend, id)
		if err == nil && j.UserID == who.user {
			return j, nil
		}
		if err != nil && !errors.Is(err, schema.ErrNotFound) {
			return nil, err
		}
	}
	list, err := jobs.Jobs(ctx, schema.JobFilter{Frontend: who.frontend, UserID: who.user, Limit: comfyListLimit})
	if err != nil {
		return nil, err
	}
	for i := range list {
		if metaOf(&list[i]).Comfy.PromptID == pid {
			return &list[i], nil
		}
	}
	return nil, schema.ErrNotFound
}

// userJobs lists the caller's newest jobs.
func (a *comfyAPI) userJobs(ctx context.Context, who comfyWho) ([]schema.Job, error) {
	jobs, err := a.s.jobService()
	if err != nil {
		return nil, err
	}
	return jobs.Jobs(ctx, schema.JobFilter{Frontend: who.frontend, UserID: who.user, Limit: comfyListLimit})
}

// queueRemaining counts the caller's unfinished jobs (ComfyUI's
// exec_info.queue_remaining: pending plus running).
func (a *comfyAPI) queueRemaining(ctx context.Context, who comfyWho) int {
	list, err := a.userJobs(ctx, who)
	if err != nil {
		return 0
	}
	n := 0
	for _, j := range list {
		if !j.State.Terminal() {
			n++
		}
	}
	return n
}

// promptInfo serves GET /prompt.
func (a *comfyAPI) promptInfo(c *fiber.Ctx) error {
	return c.JSON(fiber.Map{"exec_info": fiber.Map{"queue_remaining": a.queueRemaining(c.UserContext(), comfyWhoOf(c))}})
}

// historyOne serves GET /history/{prompt_id}: {} until the job has ended,
// as ComfyUI answers for a prompt it has no history of.
func (a *comfyAPI) historyOne(c *fiber.Ctx) error {
	pid, err := url.PathUnescape(c.Params("prompt_id"))
	if err != nil {
		return c.JSON(fiber.Map{})
	}
	j, err := a.jobOf(c.UserContext(), comfyWhoOf(c), pid)
	if errors.Is(err, schema.ErrNotFound) || err == nil && !j.State.Terminal() {
		return c.JSON(fiber.Map{})
	}
	if err != nil {
		return err
	}
	return c.JSON(map[string]any{pid: historyEntry(j, pid)})
}

// historyAll serves GET /history[?max_items=N]: the caller's ended jobs,
// oldest first, at most the newest comfyListLimit.
func (a *comfyAPI) historyAll(c *fiber.Ctx) error {
	max := comfyListLimit
	if raw := c.Query("max_items"); raw != "" {
		n, err := strconv.Atoi(raw)
		if err != nil || n < 0 {
			return schema.Invalid("max_items", "must be a non-negative integer")
		}
		max = min(n, comfyListLimit)
	}
	list, err := a.userJobs(c.UserContext(), comfyWhoOf(c))
	if err != nil {
		return err
	}
	var ended []*schema.Job
	for i := range list {
		if list[i].State.Terminal() && len(ended) < max {
			ended = append(ended, &list[i])
		}
	}
	// Keys in completion order, as ComfyUI keeps them: a JSON object
	// written by hand, since a Go map would sort them.
	var b strings.Builder
	b.WriteByte('{')
	for i := len(ended) - 1; i >= 0; i-- {
		j := ended[i]
		pid := promptIDOf(j)
		k, _ := json.Marshal(pid)
		v, err := json.Marshal(historyEntry(j, pid))
		if err != nil {
			return err
		}
		if b.Len() > 1 {
			b.WriteByte(',')
		}
		b.Write(k)
		b.WriteByte(':')
		b.Write(v)
	}
	b.WriteByte('}')
	c.Set(fiber.HeaderContentType, fiber.MIMEApplicationJSON)
	return c.SendString(b.String())
}

// queue serves GET /queue: the caller's running and pending jobs as
// ComfyUI's queue items [number, prompt_id, prompt, extra_data, outputs].
// Running means running or storing; pending means queued, or waiting in a
// node's own queue.
func (a *comfyAPI) queue(c *fiber.Ctx) error {
	list, err := a.userJobs(c.UserContext(), comfyWhoOf(c))
	if err != nil {
		return err
	}
	running, pending := []any{}, []any{}
	for i := len(list) - 1; i >= 0; i-- { // oldest first
		j := &list[i]
		item := queueItem(j, len(list)-1-i)
		switch j.State {
		case schema.JobRunning, schema.JobStoring:
			running = append(running, item)
		case schema.JobQueued, schema.JobDispatched:
			pending = append(pending, item)
		}
	}
	return c.JSON(fiber.Map{"queue_running": running, "queue_pending": pending})
}

// queueEdit serves POST /queue: {"delete":[prompt ids]} cancels those of the
// caller's jobs that have not started; {"clear":true} all of them. 200 with
// an empty body whatever matched, as ComfyUI answers.
func (a *comfyAPI) queueEdit(c *fiber.Ctx) error {
	var b struct {
		Clear  bool     `json:"clear"`
		Delete []string `json:"delete"`
	}
	if err := lenientJSON(c, &b); err != nil {
		return err
	}
	if len(b.Delete) > comfyListLimit {
		return schema.Invalid("delete", "more than %d ids", comfyListLimit)
	}
	who := comfyWhoOf(c)
	ctx := c.UserContext()
	pending := func(j *schema.Job) bool { return j.State == schema.JobQueued || j.State == schema.JobDispatched }
	if b.Clear {
		list, err := a.userJobs(ctx, who)
		if err != nil {
			return err
		}
		for i := range list {
			if pending(&list[i]) {
				if err := a.cancel(ctx, who, list[i].ID); err != nil {
					return err
				}
			}
		}
	}
	for _, pid := range b.Delete {
		j, err := a.jobOf(ctx, who, pid)
		if errors.Is(err, schema.ErrNotFound) {
			continue
		}
		if err != nil {
			return err
		}
		if pending(j) {
			if err := a.cancel(ctx, who, j.ID); err != nil {
				return err
			}
		}
	}
	return c.SendStatus(http.StatusOK)
}

// interrupt serves POST /interrupt: cancels the caller's running job (only
// the one named by {"prompt_id"} when given). 200, empty body.
func (a *comfyAPI) interrupt(c *fiber.Ctx) error {
	var b struct {
		PromptID string `json:"prompt_id"`
	}
	if err := lenientJSON(c, &b); err != nil {
		return err
	}
	who := comfyWhoOf(c)
	ctx := c.UserContext()
	var targets []schema.Job
	if b.PromptID != "" {
		j, err := a.jobOf(ctx, who, b.PromptID)
		if err != nil && !errors.Is(err, schema.ErrNotFound) {
			return err
		}
		if j != nil {
			targets = append(targets, *j)
		}
	} else {
		list, err := a.userJobs(ctx, who)
		if err != nil {
			return err
		}
		targets = list
	}
	for i := range targets {
		if targets[i].State == schema.JobRunning {
			if err := a.cancel(ctx, who, targets[i].ID); err != nil {
				return err
			}
		}
	}
	return c.SendStatus(http.StatusOK)
}

// cancel cancels a job; one that has just ended is no error.
func (a *comfyAPI) cancel(ctx context.Context, who comfyWho, id string) error {
	jobs, err := a.s.jobService()
	if err != nil {
		return err
	}
	if _, err := jobs.Cancel(ctx, who.frontend, id); err != nil && !errors.Is(err, schema.ErrTerminal) {
		return err
	}
	return nil
}

// catalogue returns the farm's ComfyCatalogue.
func (a *comfyAPI) catalogue() (ComfyCatalogue, error) {
	if cat, ok := a.s.deps.Jobs.(ComfyCatalogue); ok {
		return cat, nil
	}
	if cat, ok := a.s.deps.Nodes.(ComfyCatalogue); ok {
		return cat, nil
	}
	return nil, schema.ErrNotReady
}

// objectInfo serves GET /object_info and /object_info/{class}: the union of
// the up nodes' catalogues, kept for comfyCatalogueTTL. An unknown class
// gives {}, as in ComfyUI.
func (a *comfyAPI) objectInfo(c *fiber.Ctx) error {
	cat, err := a.catalogue()
	if err != nil {
		return err
	}
	a.catMu.Lock()
	union := a.cat
	if union == nil || a.s.cfg.NowFunc().Sub(a.catAt) > comfyCatalogueTTL {
		union, err = cat.ObjectInfo(c.UserContext())
		if err != nil {
			a.catMu.Unlock()
			return err
		}
		a.cat, a.catAt = union, a.s.cfg.NowFunc()
	}
	a.catMu.Unlock()
	if class := c.Params("class"); class != "" {
		class, err := url.PathUnescape(class)
		if err != nil {
			return c.JSON(fiber.Map{})
		}
		if info, ok := union[class]; ok {
			return c.JSON(map[string]json.RawMessage{class: info})
		}
		return c.JSON(fiber.Map{})
	}
	return c.JSON(union)
}

// systemStats serves GET /system_stats: an up node's, with the farm's
// version added as system.comfyfarm_version.
func (a *comfyAPI) systemStats(c *fiber.Ctx) error {
	cat, err := a.catalogue()
	if err != nil {
		return err
	}
	raw, err := cat.SystemStats(c.UserContext())
	if err != nil {
		return err
	}
	var stats map[string]any
	if err := json.Unmarshal(raw, &stats); err != nil || stats == nil {
		stats = map[string]any{}
	}
	sys, _ := stats["system"].(map[string]any)
	if sys == nil {
		sys = map[string]any{}
	}
	sys["comfyfarm_version"] = a.s.cfg.Version
	stats["system"] = sys
	if _, ok := stats["devices"]; !ok {
		stats["devices"] = []any{}
	}
	return c.JSON(stats)
}

// outputRef is a file as ComfyUI names it in history and executed messages.
type outputRef struct {
	Filename  string `json:"filename"`
	Subfolder string `json:"subfolder"`
	Type      string `json:"type"`
}

// outputNames are the names /view knows a job's outputs by: the name the
// node gave, prefixed by the output's index where two share a name. The
// subfolder is the job id.
func outputNames(j *schema.Job) []string {
	count := map[string]int{}
	for _, o := range j.Outputs {
		count[o.Filename]++
	}
	names := make([]string, len(j.Outputs))
	for i, o := range j.Outputs {
		name := o.Filename
		if name == "" || count[name] > 1 || !safeOutputName(name) {
			name = strconv.Itoa(i) + "_" + sanitizeName(o.Filename)
		}
		names[i] = name
	}
	return names
}

func safeOutputName(name string) bool {
	return name != "." && name != ".." && !strings.ContainsAny(name, "/\\\x00") && len(name) <= maxFilenameBytes
}

func sanitizeName(name string) string {
	if i := strings.LastIndexAny(name, "/\\"); i >= 0 {
		name = name[i+1:]
	}
	name = strings.ReplaceAll(name, "\x00", "")
	if name == "" || name == "." || name == ".." {
		name = "output"
	}
	if len(name) > 200 {
		name = name[len(name)-200:]
	}
	return name
}

func refType(o schema.Output) string {
	if o.Preview {
		return "temp"
	}
	return "output"
}

// mediaKey is the key an output is listed under in a node's output.
func mediaKey(o schema.Output) string {
	if strings.HasPrefix(o.ContentType, "audio/") {
		return "audio"
	}
	return "images"
}

// nodeOutputs groups a job's outputs by workflow node in ComfyUI's shape,
// and lists the node ids in first-seen order.
func nodeOutputs(j *schema.Job) (map[string]map[string][]outputRef, []string) {
	names := outputNames(j)
	out := map[string]map[string][]outputRef{}
	var order []string
	for i, o := range j.Outputs {
		if out[o.NodeID] == nil {
			out[o.NodeID] = map[string][]outputRef{}
			order = append(order, o.NodeID)
		}
		k := mediaKey(o)
		out[o.NodeID][k] = append(out[o.NodeID][k], outputRef{Filename: names[i], Subfolder: j.ID, Type: refType(o)})
	}
	return out, order
}

func millis(t *time.Time, fallback time.Time) int64 {
	if t != nil {
		return t.UnixMilli()
	}
	return fallback.UnixMilli()
}

// historyEntry is an ended job as a ComfyUI history entry.
func historyEntry(j *schema.Job, pid string) map[string]any {
	outputs, order := nodeOutputs(j)
	start := millis(j.StartedAt, j.CreatedAt)
	end := millis(j.FinishedAt, j.CreatedAt)
	msgs := []any{
		[]any{"execution_start", map[string]any{"prompt_id": pid, "timestamp": start}},
		[]any{"execution_cached", map[string]any{"nodes": []string{}, "prompt_id": pid, "timestamp": start}},
	}
	status := map[string]any{"status_str": "success", "completed": true}
	switch j.State {
	case schema.JobSucceeded:
		msgs = append(msgs, []any{"execution_success", map[string]any{"prompt_id": pid, "timestamp": end}})
	case schema.JobCancelled:
		status = map[string]any{"status_str": "error", "completed": false}
		msgs = append(msgs, []any{"execution_interrupted", interruptedData(j, pid, end)})
	default:
		status = map[string]any{"status_str": "error", "completed": false}
		msgs = append(msgs, []any{"execution_error", errorData(j, pid, end)})
	}
	status["messages"] = msgs
	meta := map[string]any{}
	for _, n := range order {
		meta[n] = map[string]any{"node_id": n, "display_node": n, "parent_node": nil, "real_node_id": n}
	}
	return map[string]any{
		"prompt":  queueItem(j, 0),
		"outputs": outputs,
		"status":  status,
		"meta":    meta,
	}
}

// queueItem is ComfyUI's [number, prompt_id, prompt, extra_data, outputs].
func queueItem(j *schema.Job, number int) []any {
	graph := j.Workflow
	if len(graph) == 0 {
		graph = json.RawMessage(`{}`)
	}
	m := metaOf(j)
	extra := map[string]any{"create_time": j.CreatedAt.UnixMilli()}
	if m.Comfy.ClientID != "" {
		extra["client_id"] = m.Comfy.ClientID
	}
	return []any{number, promptIDOf(j), graph, extra, outputNodeIDs(graph)}
}

// outputNodeIDs lists the graph's nodes that no other node takes input from
// (ComfyUI's outputs_to_execute are its output nodes; without the node
// catalogue, the sinks of the graph are the best reading).
func outputNodeIDs(graph json.RawMessage) []string {
	var g map[string]struct {
		Inputs map[string]json.RawMessage `json:"inputs"`
	}
	if json.Unmarshal(graph, &g) != nil {
		return []string{}
	}
	used := map[string]bool{}
	for _, n := range g {
		for _, v := range n.Inputs {
			var link []json.RawMessage
			if json.Unmarshal(v, &link) == nil && len(link) == 2 {
				var src string
				if json.Unmarshal(link[0], &src) == nil {
					used[src] = true
				}
			}
		}
	}
	ids := []string{}
	for id := range g {
		if !used[id] {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	return ids
}

func errorData(j *schema.Job, pid string, ts int64) map[string]any {
	e := j.Error
	if e == nil {
		e = &schema.JobError{Code: "failed", Message: "the job failed"}
	}
	return map[string]any{
		"prompt_id": pid, "node_id": e.NodeID, "node_type": e.NodeType, "executed": []string{},
		"exception_message": e.Message, "exception_type": e.Code, "traceback": []string{},
		"current_inputs": map[string]any{}, "current_outputs": map[string]any{}, "timestamp": ts,
	}
}

func interruptedData(j *schema.Job, pid string, ts int64) map[string]any {
	node := ""
	if j.Progress != nil {
		node = j.Progress.NodeID
	}
	return map[string]any{"prompt_id": pid, "node_id": node, "node_type": "", "executed": []string{}, "timestamp": ts}
}

// lenientJSON decodes a ComfyUI body as ComfyUI does: whatever the
// Content-Type (Python's urllib sends a form type), unknown fields ignored,
// an empty body meaning {}.
func lenientJSON(c *fiber.Ctx, v any) error {
	body := c.Body()
	if len(bytes.TrimSpace(body)) == 0 {
		return nil
	}
	if err := json.Unmarshal(body, v); err != nil {
		return newAPIError(http.StatusBadRequest, "invalid_json", "the body is not the JSON object expected")
	}
	return nil
}

// logPath is a request path as the access log shows it: the credential in a
// ComfyUI API token path is left out.
func logPath(p string) string {
	rest, ok := strings.CutPrefix(p, "/comfy/u/")
	if !ok {
		return p
	}
	_, after, found := strings.Cut(rest, "/")
	if !found {
		return "/comfy/u/-"
	}
	return "/comfy/u/-/" + after
}

// features serves GET /features: what this API offers of ComfyUI's feature
// flags (no preview metadata: the socket sends no previews).
func (a *comfyAPI) features(c *fiber.Ctx) error {
	return c.JSON(fiber.Map{"supports_preview_metadata": false, "max_upload_size": a.s.cfg.MaxUploadBytes})
}
