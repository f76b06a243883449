package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"mime/multipart"
	"net/http"
	"sort"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// maxPromptUploads bounds the uploaded images one prompt may use (the farm
// takes at most 16 input images per job).
const maxPromptUploads = 16

// uploadKey is where a user's uploaded image of a name is kept: under the
// frontend, a digest of the user and a digest of the name, so that no name
// a client sends becomes part of a path.
func uploadKey(who comfyWho, name string) string {
	u := sha256.Sum256([]byte(who.user))
	n := sha256.Sum256([]byte(name))
	return "comfy-uploads/" + who.frontend + "/" + hex.EncodeToString(u[:16]) + "/" + hex.EncodeToString(n[:16])
}

// upload serves POST /upload/image: the multipart field "image" is kept for
// the caller's later prompts, whose image inputs (LoadImage's "image") may
// name it; the image is checked (type, size, pixels) when a prompt uses it.
// A file of the same name replaces the earlier one, and the subfolder is
// not used: the answer names the file as prompts must.
func (a *comfyAPI) upload(c *fiber.Ctx) error {
	store := a.s.deps.Store
	if store == nil {
		return schema.ErrNotReady
	}
	form, err := c.MultipartForm()
	if err != nil {
		if errors.Is(err, multipart.ErrMessageTooLarge) {
			return newAPIError(http.StatusRequestEntityTooLarge, "too_large", "multipart form too large")
		}
		return newAPIError(http.StatusBadRequest, "invalid_multipart", "send multipart/form-data with the file in \"image\"")
	}
	files := form.File["image"]
	if len(files) != 1 {
		return schema.Invalid("image", "send one file in the field \"image\"")
	}
	if t := form.Value["type"]; len(t) > 0 && t[0] != "" && t[0] != "input" {
		return schema.Invalid("type", "only input images can be uploaded")
	}
	fh := files[0]
	if err := checkFilename(fh.Filename); err != nil {
		return err
	}
	if fh.Size > a.s.cfg.MaxUploadBytes {
		return newAPIError(http.StatusRequestEntityTooLarge, "too_large", "the file is larger than the limit").
			with("limit_bytes", a.s.cfg.MaxUploadBytes)
	}
	if fh.Size == 0 {
		return schema.Invalid("image", "the file is empty")
	}
	f, err := fh.Open()
	if err != nil {
		return err
	}
	defer f.Close()
	if err := store.Put(c.UserContext(), uploadKey(comfyWhoOf(c), fh.Filename), f, fh.Size, fiber.MIMEOctetStream); err != nil {
		return err
	}
	return c.JSON(fiber.Map{"name": fh.Filename, "subfolder": "", "type": "input"})
}

// uploadedInputs are the caller's uploaded images that the prompt's image
// inputs name, as input files of the job.
func (a *comfyAPI) uploadedInputs(ctx context.Context, who comfyWho, p *comfyPrompt) ([]schema.InputFile, error) {
	store := a.s.deps.Store
	if store == nil || len(p.images) == 0 {
		return nil, nil
	}
	names := make([]string, 0, len(p.images))
	for n := range p.images {
		if checkFilename(n) == nil {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	var inputs []schema.InputFile
	for _, name := range names {
		key := uploadKey(who, name)
		rc, info, err := store.Get(ctx, key)
		if errors.Is(err, schema.ErrNotFound) {
			continue // a file the node itself has, perhaps
		}
		if err != nil {
			return nil, err
		}
		rc.Close()
		if len(inputs) == maxPromptUploads {
			return nil, schema.Invalid("prompt", "uses more than %d uploaded images", maxPromptUploads)
		}
		inputs = append(inputs, schema.InputFile{
			Filename: name,
			Size:     info.Size,
			Open: func() (io.ReadCloser, error) {
				rc, _, err := store.Get(ctx, key)
				return rc, err
			},
		})
	}
	return inputs, nil
}
