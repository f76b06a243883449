package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// apiClient talks to a running comfyfarm server.
type apiClient struct {
	base string // e.g. http://127.0.0.1:8080
	key  string
	http *http.Client
}

func newAPIClient(base, key string) (*apiClient, error) {
	base = strings.TrimRight(base, "/")
	if !strings.HasPrefix(base, "http://") && !strings.HasPrefix(base, "https://") {
		return nil, fmt.Errorf("--server %q: want http://host:port", base)
	}
	// No overall timeout: event streams last as long as the job. Requests
	// are bounded by their contexts.
	return &apiClient{base: base, key: key, http: &http.Client{}}, nil
}

// apiError is an error answer of the server.
type apiError struct {
	Status  int
	Code    string
	Message string
}

func (e *apiError) Error() string {
	return fmt.Sprintf("server answered %d %s: %s", e.Status, e.Code, e.Message)
}

func (c *apiClient) request(ctx context.Context, method, path string, body io.Reader, contentType string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	if c.key != "" {
		req.Header.Set("Authorization", "Bearer "+c.key)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	return req, nil
}

// do sends a request and decodes a 2xx JSON answer into out (if not nil).
func (c *apiClient) do(ctx context.Context, req *http.Request, out any) error {
	res, err := c.http.Do(req.WithContext(ctx))
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode/100 != 2 {
		return readAPIError(res)
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(res.Body, 64<<20)).Decode(out); err != nil {
		return fmt.Errorf("decode answer of %s %s: %w", req.Method, req.URL.Path, err)
	}
	return nil
}

// call sends body (when not nil) as JSON and decodes a 2xx JSON answer into
// out (when not nil).
func (c *apiClient) call(ctx context.Context, method, path string, body, out any) error {
	var rd io.Reader
	contentType := ""
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd, contentType = bytes.NewReader(data), "application/json"
	}
	req, err := c.request(ctx, method, path, rd, contentType)
	if err != nil {
		return err
	}
	return c.do(ctx, req, out)
}

func readAPIError(res *http.Response) error {
	data, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	var body struct {
		Error struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	e := &apiError{Status: res.StatusCode}
	if json.Unmarshal(data, &body) == nil && body.Error.Code != "" {
		e.Code, e.Message = body.Error.Code, body.Error.Message
	} else {
		e.Code, e.Message = http.StatusText(res.StatusCode), strings.TrimSpace(string(data))
	}
	return e
}

// sseEvent is one Server-Sent Events message.
type sseEvent struct {
	ID    string
	Event string
	Data  string
}

// sseReader reads Server-Sent Events (the WHATWG format: field lines, a
// blank line ends a message, lines starting with ":" are comments).
type sseReader struct {
	r *bufio.Reader
}

// maxSSELine bounds one line of the stream.
const maxSSELine = 8 << 20

func newSSEReader(r io.Reader) *sseReader { return &sseReader{r: bufio.NewReaderSize(r, 64<<10)} }

// Next returns the next message with data; comments and empty messages are
// skipped. io.EOF at the end of the stream.
func (s *sseReader) Next() (sseEvent, error) {
	var ev sseEvent
	var data []string
	hasData := false
	for {
		line, err := s.readLine()
		if err != nil {
			if errors.Is(err, io.EOF) && hasData {
				return ev, io.ErrUnexpectedEOF
			}
			return ev, err
		}
		if line == "" {
			if hasData {
				ev.Data = strings.Join(data, "\n")
				return ev, nil
			}
			ev = sseEvent{}
			continue
		}
		if line[0] == ':' {
			continue
		}
		name, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch name {
		case "id":
			ev.ID = value
		case "event":
			ev.Event = value
		case "data":
			data, hasData = append(data, value), true
		}
	}
}

func (s *sseReader) readLine() (string, error) {
	var sb strings.Builder
	for {
		chunk, isPrefix, err := s.r.ReadLine()
		if err != nil {
			return "", err
		}
		if sb.Len()+len(chunk) > maxSSELine {
			return "", errors.New("event stream line too long")
		}
		sb.Write(chunk)
		if !isPrefix {
			return strings.TrimSuffix(sb.String(), "\r"), nil
		}
	}
}

// requestTimeout bounds one plain API call of the CLI.
const requestTimeout = 60 * time.Second
