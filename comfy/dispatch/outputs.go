package dispatch

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"github.com/jmoiron/sqlx"

	"github.com/comfyfarm/comfyfarm/comfy"
	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
)

type nodeReadError struct{ err error }

func (e *nodeReadError) Error() string { return "read from node: " + e.err.Error() }
func (e *nodeReadError) Unwrap() error { return e.err }

type permanentError struct{ jerr *schema.JobError }

func (e *permanentError) Error() string { return e.jerr.Error() }

// copyOutputs streams each output file from the node into storage and writes
// the photo rows. It returns the job's outputs.
func (f *Farm) copyOutputs(ctx context.Context, r *runner, job *schema.Job, entry *comfy.HistoryEntry) ([]schema.Output, error) {
	ctrl, err := f.frontends.Get(job.Frontend)
	if err != nil {
		return nil, &permanentError{&schema.JobError{Code: schema.CodeStorageFailed, Message: "frontend no longer configured"}}
	}
	files := keptFiles(entry.Files(), ctrl.KeepTempOutputs())
	var outputs []schema.Output
	var photos []*schema.Photo
	for _, fr := range files {
		obj, err := f.copyOne(ctx, r, job, fr, len(outputs))
		if err != nil {
			return nil, err
		}
		if ctrl.AcceptOutput(obj.ContentType) != nil {
			_ = f.storage.Delete(ctx, obj.Key)
			r.log.Info("output refused by the frontend's controller", "job_id", job.ID, "content_type", obj.ContentType)
			continue
		}
		meta := job.Metadata
		if fr.Type == "temp" {
			obj.Preview = true
			meta = previewMetadata(meta)
		}
		outputs = append(outputs, obj)
		photos = append(photos, &schema.Photo{
			UserID: job.UserID, JobID: job.ID, OutputIndex: len(photos), ObjectKey: obj.Key,
			ContentType: obj.ContentType, Width: obj.Width, Height: obj.Height, Bytes: obj.Bytes,
			SHA256: obj.SHA256, Node: r.name, Metadata: meta,
		})
	}
	if len(outputs) == 0 {
		return nil, &permanentError{&schema.JobError{Code: schema.CodeNoOutputs, Message: "the workflow produced no output this frontend accepts"}}
	}
	err = dbcontrollers.InTx(ctx, ctrl.DB(), func(tx *sqlx.Tx) error {
		if _, err := ctrl.UserEnsure(ctx, tx, job.UserID); err != nil {
			return err
		}
		for i, p := range photos {
			if err := ctrl.PhotoInsert(ctx, tx, p); err != nil {
				return fmt.Errorf("photo %d: %w", i, err)
			}
			outputs[i].PhotoID = p.ID
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return outputs, nil
}

// keptFiles are the files of a finished prompt that become outputs: what the
// workflow saved (type "output"; "" from servers that leave the type out),
// and its temporary files (type "temp": PreviewImage, the previews of
// animated outputs) only when keepTemp. Inputs echoed back (LoadImage) are
// never the job's.
func keptFiles(all []comfy.FileRef, keepTemp bool) []comfy.FileRef {
	var files []comfy.FileRef
	for _, fr := range all {
		switch fr.Type {
		case "output", "":
			files = append(files, fr)
		case "temp":
			if keepTemp {
				files = append(files, fr)
			}
		}
	}
	return files
}

// previewKey marks a preview's photo in its metadata.
const previewKey = "comfyfarm_preview"

// previewMetadata is a job's metadata with "comfyfarm_preview": true added,
// for the photo of a temp file. Metadata that is not an object is kept
// under "metadata".
func previewMetadata(meta json.RawMessage) json.RawMessage {
	obj := map[string]json.RawMessage{}
	if trimmed := bytes.TrimSpace(meta); len(trimmed) > 0 && !bytes.Equal(trimmed, []byte("null")) {
		if json.Unmarshal(trimmed, &obj) != nil {
			obj = map[string]json.RawMessage{"metadata": trimmed}
		}
	}
	obj[previewKey] = json.RawMessage("true")
	out, err := json.Marshal(obj)
	if err != nil {
		return meta
	}
	return out
}

// copyOne streams one file from the node into storage, hashing it and
// reading its header (type, size in pixels) on the way. When the node does
// not announce the file's length, the file is first copied to a temporary
// file, since a storage Put is given the size. The node's filename only ever
// goes back to the node as a query parameter; the object key is ours.
func (f *Farm) copyOne(ctx context.Context, r *runner, job *schema.Job, fr comfy.FileRef, index int) (schema.Output, error) {
	if err := fr.Validate(); err != nil {
		return schema.Output{}, &permanentError{&schema.JobError{Code: schema.CodeStorageFailed, Message: "the node named an unsafe output file", NodeID: fr.NodeID}}
	}
	rc, err := r.client.View(ctx, fr, f.cfg.MaxOutputBytes)
	if err != nil {
		return schema.Output{}, viewError(err, fr)
	}
	defer rc.Close()
	size := int64(-1)
	if s, ok := rc.(interface{ Size() int64 }); ok {
		size = s.Size()
	}
	br := bufio.NewReaderSize(rc, 64<<10)
	head, err := br.Peek(64 << 10)
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, bufio.ErrBufferFull) {
		return schema.Output{}, viewError(err, fr)
	}
	ct, ext := oss.Sniff(head)
	out := schema.Output{
		ContentType: ct, Filename: safeBase(fr.Filename), NodeID: fr.NodeID,
		Key: oss.ObjectKey(job.Frontend, job.CreatedAt, job.ID, index, ext),
	}
	if strings.HasPrefix(ct, "image/") {
		if meta, err := oss.ImageInfo(bytes.NewReader(head)); err == nil {
			out.Width, out.Height = meta.Width, meta.Height
		}
	}
	h := sha256.New()
	src := &readTrap{r: io.TeeReader(br, h)}
	var body io.Reader = src
	if size < 0 {
		tmp, n, err := spool(src)
		if err != nil {
			if src.err != nil {
				return schema.Output{}, viewError(src.err, fr)
			}
			return schema.Output{}, err
		}
		defer os.Remove(tmp.Name())
		defer tmp.Close()
		body, size = tmp, n
	}
	if err := f.storage.Put(ctx, out.Key, body, size, ct); err != nil {
		if src.err != nil {
			return schema.Output{}, viewError(src.err, fr)
		}
		return schema.Output{}, fmt.Errorf("put %s: %w", out.Key, err)
	}
	out.Bytes, out.SHA256 = size, hex.EncodeToString(h.Sum(nil))
	return out, nil
}

// viewError classes an error of reading an output from its node.
func viewError(err error, fr comfy.FileRef) error {
	if errors.Is(err, comfy.ErrTooLarge) {
		return &permanentError{&schema.JobError{Code: schema.CodeStorageFailed, Message: "an output is larger than the limit", NodeID: fr.NodeID}}
	}
	return &nodeReadError{err}
}

// readTrap remembers the first error of its reader other than io.EOF, so
// that a failed Put can be told apart from a failed read of the node.
type readTrap struct {
	r   io.Reader
	err error
}

func (t *readTrap) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) && t.err == nil {
		t.err = err
	}
	return n, err
}

// spool copies r to a new temporary file, rewound, and returns it with its
// length. The caller removes and closes it.
func spool(r io.Reader) (*os.File, int64, error) {
	tmp, err := os.CreateTemp("", "comfyfarm-output-*")
	if err != nil {
		return nil, 0, err
	}
	n, err := io.Copy(tmp, r)
	if err == nil {
		_, err = tmp.Seek(0, io.SeekStart)
	}
	if err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return nil, 0, err
	}
	return tmp, n, nil
}

// safeBase keeps only the last element of a node-supplied name, for display.
func safeBase(name string) string {
	name = strings.ReplaceAll(name, "\\", "/")
	b := path.Base(name)
	if b == "." || b == "/" || b == ".." {
		return ""
	}
	return b
}

// succeed marks the job succeeded with its outputs and tells subscribers.
func (f *Farm) succeed(ctx context.Context, r *runner, job *schema.Job, outputs []schema.Output) {
	done, err := f.updateJob(ctx, dbcontrollers.JobSucceed(job.ID, job.Attempts, outputs, f.cfg.NowFunc()))
	r.forget(jobRef{job.ID, job.Attempts})
	if err != nil {
		if !errors.Is(err, schema.ErrConflict) && ctx.Err() == nil {
			r.log.Error("mark succeeded", "job_id", job.ID, "err", err)
		}
		return
	}
	f.nodes.JobSucceeded(r.name)
	f.metrics.jobFinished(done)
	f.tally.finished(done.Node, done.State)
	f.metrics.jobSeconds.Observe(done.FinishedAt.Sub(done.CreatedAt).Seconds())
	f.hub.Publish(job.ID, schema.Event{Type: schema.EventSucceeded, Outputs: done.Outputs})
}
