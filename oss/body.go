package oss

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// replayBody is an upload body that every retry can read again from the
// start. A seekable source is used in place; anything else is copied, into
// memory when it is small and into an unlinked temporary file when not.
type replayBody struct {
	src   io.ReadSeeker
	start int64
	size  int64
	file  *os.File // spool file, closed by Close

	cur *attemptReader
}

// errAttemptOver is what a finished attempt's body returns if the HTTP
// transport still reads it after the request has been given up.
var errAttemptOver = errors.New("upload attempt is over")

// newReplayBody prepares r (size bytes, or -1 when unknown) for replay.
// Non-seekable bodies of up to memMax bytes are kept in memory.
func newReplayBody(r io.Reader, size, memMax int64, tmpDir string) (*replayBody, error) {
	if rs, ok := r.(io.ReadSeeker); ok {
		start, err := rs.Seek(0, io.SeekCurrent)
		if err != nil {
			return nil, err
		}
		end, err := rs.Seek(0, io.SeekEnd)
		if err != nil {
			return nil, err
		}
		if _, err := rs.Seek(start, io.SeekStart); err != nil {
			return nil, err
		}
		if size >= 0 && end-start != size {
			return nil, fmt.Errorf("reader holds %d bytes, want %d", end-start, size)
		}
		return &replayBody{src: rs, start: start, size: end - start}, nil
	}

	limit := memMax
	if size >= 0 && size <= memMax {
		limit = size
	}
	// Read one byte more than fits, to learn whether it all did.
	buf, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(buf)) <= limit {
		if size >= 0 && int64(len(buf)) != size {
			return nil, fmt.Errorf("reader gave %d bytes, want %d", len(buf), size)
		}
		return &replayBody{src: bytes.NewReader(buf), size: int64(len(buf))}, nil
	}
	if size >= 0 && size <= memMax {
		return nil, fmt.Errorf("reader gave more than %d bytes", size)
	}

	f, err := os.CreateTemp(tmpDir, "comfyfarm-upload-*")
	if err != nil {
		return nil, err
	}
	// Unlinked at once: the open file stays usable and nothing is left behind.
	_ = os.Remove(f.Name())
	rest := r
	if size >= 0 {
		rest = io.LimitReader(r, size-int64(len(buf))+1)
	}
	n, err := io.Copy(f, io.MultiReader(bytes.NewReader(buf), rest))
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	if size >= 0 && n != size {
		_ = f.Close()
		return nil, fmt.Errorf("reader gave %d bytes, want %d", n, size)
	}
	return &replayBody{src: f, size: n, file: f}, nil
}

// attempt ends the previous attempt's reader, rewinds, and returns a reader
// of exactly size bytes for the next attempt. Its type, *io.LimitedReader,
// lets the SDK send a Content-Length.
func (b *replayBody) attempt() (*io.LimitedReader, error) {
	b.stop()
	if _, err := b.src.Seek(b.start, io.SeekStart); err != nil {
		return nil, err
	}
	b.cur = &attemptReader{r: b.src}
	return &io.LimitedReader{R: b.cur, N: b.size}, nil
}

// stop fences off the current attempt's reader: once it returns, no read of
// that attempt is running or can start, so the source may be rewound.
func (b *replayBody) stop() {
	if b.cur != nil {
		b.cur.stop()
		b.cur = nil
	}
}

// Close stops the last attempt and drops the spool file.
func (b *replayBody) Close() error {
	b.stop()
	if b.file != nil {
		return b.file.Close()
	}
	return nil
}

// attemptReader is the body of one upload attempt. The HTTP transport may
// read a request body from another goroutine even after the request has
// returned; stop makes such late reads fail instead of racing the rewind.
type attemptReader struct {
	mu   sync.Mutex
	r    io.Reader
	over bool
}

func (a *attemptReader) Read(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.over {
		return 0, errAttemptOver
	}
	return a.r.Read(p)
}

func (a *attemptReader) stop() {
	a.mu.Lock()
	a.over = true
	a.mu.Unlock()
}

// window returns a seekable view of exactly the body's bytes, for an SDK that
// seeks the body itself (to hash it, and to rewind it for a retry). Its stop
// fences off late reads as attemptReader's does.
func (b *replayBody) window() *bodyWindow {
	b.stop()
	return &bodyWindow{src: b.src, start: b.start, size: b.size, at: -1}
}

// bodyWindow reads [start, start+size) of src. Reads and seeks are
// serialised, so a transport still reading an abandoned attempt cannot race
// the SDK rewinding for the next one.
type bodyWindow struct {
	mu    sync.Mutex
	src   io.ReadSeeker
	start int64
	size  int64
	off   int64 // position within the window
	at    int64 // src's position, -1 if unknown
	over  bool
}

func (w *bodyWindow) Read(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.over {
		return 0, errAttemptOver
	}
	if w.off >= w.size {
		return 0, io.EOF
	}
	if w.at != w.start+w.off {
		if _, err := w.src.Seek(w.start+w.off, io.SeekStart); err != nil {
			w.at = -1
			return 0, err
		}
		w.at = w.start + w.off
	}
	if rest := w.size - w.off; int64(len(p)) > rest {
		p = p[:rest]
	}
	n, err := w.src.Read(p)
	w.off += int64(n)
	w.at += int64(n)
	if err == io.EOF && w.off < w.size {
		err = io.ErrUnexpectedEOF
	} else if err == io.EOF {
		err = nil
	}
	return n, err
}

func (w *bodyWindow) Seek(offset int64, whence int) (int64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var abs int64
	switch whence {
	case io.SeekStart:
		abs = offset
	case io.SeekCurrent:
		abs = w.off + offset
	case io.SeekEnd:
		abs = w.size + offset
	default:
		return 0, errors.New("bodyWindow.Seek: invalid whence")
	}
	if abs < 0 {
		return 0, errors.New("bodyWindow.Seek: negative position")
	}
	w.off = abs
	return abs, nil
}

func (w *bodyWindow) stop() {
	w.mu.Lock()
	w.over = true
	w.mu.Unlock()
}
