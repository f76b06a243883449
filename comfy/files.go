package comfy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"net/url"
	"path"
	"strings"
	"time"
)

// DefaultMaxViewBytes is the cap View applies when maxBytes <= 0.
const DefaultMaxViewBytes = 1 << 30

// View streams a file from GET /view. Reading past maxBytes (<= 0: DefaultMaxViewBytes) fails
// with ErrTooLarge, and so does a Content-Length above it. A missing file is an *APIError with
// Status 404. The request timeout bounds only the wait for the response headers; the body is
// bounded by ctx. The caller must close the reader. The reader also has a Size() int64 method:
// the Content-Length the server announced, -1 when it sent none.
func (c *Client) View(ctx context.Context, f FileRef, maxBytes int64) (io.ReadCloser, error) {
	if err := f.Validate(); err != nil {
		return nil, err
	}
	if maxBytes <= 0 {
		maxBytes = DefaultMaxViewBytes
	}
	q := url.Values{"filename": {f.Filename}, "subfolder": {f.Subfolder}}
	if f.Type != "" {
		q.Set("type", f.Type)
	}
	ctx, cancel := context.WithCancel(ctx)
	timer := time.AfterFunc(c.reqTimeout, cancel)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.endpoint("/view", q), nil)
	if err != nil {
		timer.Stop()
		cancel()
		return nil, fmt.Errorf("comfy: GET /view: %w", err)
	}
	req.Header.Set("User-Agent", c.userAgent)
	resp, err := c.hc.Do(req)
	stopped := timer.Stop()
	if err != nil {
		cancel()
		if !stopped && ctx.Err() != nil {
			err = fmt.Errorf("%w (no response headers within %s)", context.DeadlineExceeded, c.reqTimeout)
		}
		return nil, fmt.Errorf("comfy: GET /view %s: %w", f.Path(), err)
	}
	if resp.StatusCode/100 != 2 {
		defer cancel()
		defer resp.Body.Close()
		return nil, readAPIError(http.MethodGet, "/view", resp)
	}
	if resp.ContentLength > maxBytes {
		resp.Body.Close()
		cancel()
		return nil, fmt.Errorf("comfy: GET /view %s: %w: %d bytes, cap %d", f.Path(), ErrTooLarge, resp.ContentLength, maxBytes)
	}
	return &cappedBody{rc: resp.Body, left: maxBytes, cancel: cancel, size: resp.ContentLength}, nil
}

// cappedBody fails with ErrTooLarge once more than the allowed bytes arrive.
type cappedBody struct {
	rc     io.ReadCloser
	left   int64
	cancel context.CancelFunc
	err    error
	size   int64 // Content-Length, -1 when not sent
}

// Size is the length the server announced for the body (its Content-Length),
// or -1 when it sent none. A body that ends short of it fails with
// io.ErrUnexpectedEOF.
func (b *cappedBody) Size() int64 { return b.size }

func (b *cappedBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if int64(len(p)) > b.left+1 {
		p = p[:b.left+1]
	}
	n, err := b.rc.Read(p)
	if int64(n) > b.left {
		n = int(b.left)
		b.left = 0
		b.err = fmt.Errorf("comfy: /view body: %w", ErrTooLarge)
		return n, b.err
	}
	b.left -= int64(n)
	if err != nil && err != io.EOF {
		b.err = err
	}
	return n, err
}

func (b *cappedBody) Close() error {
	err := b.rc.Close()
	b.cancel()
	return err
}

// UploadRequest is an image for POST /upload/image.
type UploadRequest struct {
	// Name is the file name to store under (no path separators).
	Name string
	Body io.Reader
	// Subfolder inside the target folder ("" for none).
	Subfolder string
	// Overwrite replaces an existing file of the same name; otherwise a clash becomes
	// "name (1).ext" unless the bytes are identical.
	Overwrite bool
	// Type is the target folder: input (default), temp or output.
	Type string
}

// UploadResult is where the server stored an upload. Use it (not the requested name):
// the server may have renamed the file.
type UploadResult struct {
	Name      string `json:"name"`
	Subfolder string `json:"subfolder"`
	Type      string `json:"type"`
}

// LoadImageValue is the value for a LoadImage "image" input: "subfolder/name", or name. A file
// stored outside the input folder gets ComfyUI's " [output]"/" [temp]" annotation.
func (r UploadResult) LoadImageValue() string {
	v := r.Name
	if r.Subfolder != "" {
		v = r.Subfolder + "/" + r.Name
	}
	if r.Type != "" && r.Type != "input" {
		v += " [" + r.Type + "]"
	}
	return v
}

// UploadImage streams an image to POST /upload/image (multipart field "image"). Bodies above
// the server's --max-upload-size fail with ErrTooLarge.
func (c *Client) UploadImage(ctx context.Context, ur UploadRequest) (*UploadResult, error) {
	if ur.Name == "" || ur.Name == "." || ur.Name == ".." || strings.ContainsAny(ur.Name, "/\\\x00") {
		return nil, fmt.Errorf("comfy: upload: bad file name %q", ur.Name)
	}
	if ur.Body == nil {
		return nil, errors.New("comfy: upload: no body")
	}
	switch ur.Type {
	case "", "input", "temp", "output":
	default:
		return nil, fmt.Errorf("comfy: upload: type %q (want input, temp or output)", ur.Type)
	}
	pr, pw := io.Pipe()
	mw := multipart.NewWriter(pw)
	go func() {
		pw.CloseWithError(writeUpload(mw, ur))
	}()
	var res UploadResult
	err := c.doJSON(ctx, request{
		method: http.MethodPost, path: "/upload/image", body: pr,
		contentType: mw.FormDataContentType(), timeout: c.longTimeout,
	}, &res)
	pr.CloseWithError(errors.New("comfy: upload finished")) // unblocks the writer on early failure
	if err != nil {
		return nil, err
	}
	if res.Name == "" {
		return nil, errors.New("comfy: upload: response has no name")
	}
	return &res, nil
}

func writeUpload(mw *multipart.Writer, ur UploadRequest) error {
	if ur.Overwrite {
		if err := mw.WriteField("overwrite", "true"); err != nil {
			return err
		}
	}
	if ur.Type != "" {
		if err := mw.WriteField("type", ur.Type); err != nil {
			return err
		}
	}
	if ur.Subfolder != "" {
		if err := mw.WriteField("subfolder", ur.Subfolder); err != nil {
			return err
		}
	}
	h := make(textproto.MIMEHeader)
	h.Set("Content-Disposition", mime.FormatMediaType("form-data", map[string]string{"name": "image", "filename": ur.Name}))
	ct := mime.TypeByExtension(strings.ToLower(path.Ext(ur.Name)))
	if ct == "" {
		ct = "application/octet-stream"
	}
	h.Set("Content-Type", ct)
	part, err := mw.CreatePart(h)
	if err != nil {
		return err
	}
	if _, err := io.Copy(part, ur.Body); err != nil {
		return err
	}
	return mw.Close()
}
