package server

import (
	"net/http"
	"strconv"
	"sync"
)

// Default stream caps (Config.MaxStreamsPerKey, Config.MaxStreams).
const (
	defaultMaxStreamsPerKey = 2000
	defaultMaxStreams       = 20000
)

// maxTokenStreamsPerJob bounds the streams open at once on one job's events
// token: whoever holds a token could otherwise open streams without end, and
// a token names no API key to count them against.
const maxTokenStreamsPerJob = 32

// streamRefusal says which cap refused a stream.
type streamRefusal uint8

const (
	streamAllowed streamRefusal = iota
	streamRefusedKey
	streamRefusedToken
	streamRefusedTotal
)

func (r streamRefusal) String() string {
	switch r {
	case streamRefusedKey:
		return "key"
	case streamRefusedToken:
		return "token"
	case streamRefusedTotal:
		return "total"
	}
	return "allowed"
}

// streamLimits counts the open event streams (SSE and WebSocket) and refuses
// a new one past any of three caps: per API key (keyed streams), per job
// (streams opened with the job's events token) and in total. Every open
// stream holds a subscription, a goroutine or two and socket buffers, so the
// total bounds the server's memory and each key's share keeps one client
// from taking all of it.
type streamLimits struct {
	perKey, total int

	mu    sync.Mutex
	open  int
	byKey map[int]int    // keyring index -> open keyed streams
	byJob map[string]int // job id -> open token streams
}

func newStreamLimits(perKey, total int) *streamLimits {
	return &streamLimits{perKey: perKey, total: total, byKey: map[int]int{}, byJob: map[string]int{}}
}

// take counts one more stream for req, or refuses it and counts nothing.
func (l *streamLimits) take(req streamReq) streamRefusal {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case req.token && l.byJob[req.jobID] >= maxTokenStreamsPerJob:
		return streamRefusedToken
	case !req.token && l.byKey[req.key] >= l.perKey:
		return streamRefusedKey
	case l.open >= l.total:
		return streamRefusedTotal
	}
	l.open++
	if req.token {
		l.byJob[req.jobID]++
	} else {
		l.byKey[req.key]++
	}
	return streamAllowed
}

// give ends a stream that take allowed.
func (l *streamLimits) give(req streamReq) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.open--
	if req.token {
		if l.byJob[req.jobID]--; l.byJob[req.jobID] <= 0 {
			delete(l.byJob, req.jobID)
		}
	} else if l.byKey[req.key]--; l.byKey[req.key] <= 0 {
		delete(l.byKey, req.key)
	}
}

// count is the number of open streams.
func (l *streamLimits) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open
}

// takeStream takes a stream slot for req, counting a refusal in the metrics.
func (s *Server) takeStream(req streamReq) streamRefusal {
	r := s.streams.take(req)
	if r != streamAllowed {
		s.metrics.streamsRefused.WithLabelValues(r.String()).Inc()
	}
	return r
}

// streamError is what an SSE request refused by r gets.
func (s *Server) streamError(r streamRefusal) *apiError {
	switch r {
	case streamRefusedKey:
		return newAPIError(http.StatusTooManyRequests, "rate_limited",
			"too many event streams are open on this api key ("+strconv.Itoa(s.streams.perKey)+"); close one first").
			with("limit", s.streams.perKey)
	case streamRefusedToken:
		return newAPIError(http.StatusTooManyRequests, "rate_limited",
			"too many event streams are open on this job's token; close one first").
			with("limit", maxTokenStreamsPerJob)
	}
	return newAPIError(http.StatusServiceUnavailable, "too_many_streams",
		"the server holds as many event streams as it may; try again later").
		with("limit", s.streams.total)
}
