package server

import (
	"context"
	"errors"
	"net/http"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

// Photo listing bounds.
const (
	defaultPhotoLimit = 20
	maxPhotoLimit     = 100
	maxPage           = 1_000_000
)

// photoPage is the GET /photos response.
type photoPage struct {
	Photos []schema.Photo `json:"photos"`
	Total  int            `json:"total"`
	Page   int            `json:"page"`
	Limit  int            `json:"limit"`
}

// photoList lists a frontend's photos, newest first, a page at a time.
// user_id narrows to one user; style narrows where the frontend's controller
// knows styles.
func (s *Server) photoList(c *fiber.Ctx) error {
	userID := query(c, "user_id")
	if userID != "" {
		if err := checkUserID("user_id", userID); err != nil {
			return err
		}
	}
	page, err := intQuery(c, "page", 1, 1, maxPage)
	if err != nil {
		return err
	}
	limit, err := intQuery(c, "limit", defaultPhotoLimit, 1, maxPhotoLimit)
	if err != nil {
		return err
	}
	style := query(c, "style")
	if len(style) > 64 {
		return schema.Invalid("style", "longer than 64 bytes")
	}
	ctrl, err := s.controller(c, "")
	if err != nil {
		return err
	}
	photos, total, err := ctrl.PhotoList(c.UserContext(), ctrl.DB(), dbcontrollers.PhotoFilter{
		UserID: userID, Page: page, Limit: limit, Style: style,
	})
	if err != nil {
		return err
	}
	if photos == nil {
		photos = []schema.Photo{}
	}
	for i := range photos {
		if err := s.photoURL(c.UserContext(), &photos[i]); err != nil {
			return err
		}
	}
	return c.JSON(photoPage{Photos: photos, Total: total, Page: page, Limit: limit})
}

func (s *Server) photoGet(c *fiber.Ctx) error {
	id, err := idParam(c, "id")
	if err != nil {
		return err
	}
	ctrl, err := s.controller(c, "")
	if err != nil {
		return err
	}
	p, err := ctrl.PhotoGet(c.UserContext(), ctrl.DB(), id)
	if err != nil {
		return err
	}
	if err := s.photoURL(c.UserContext(), p); err != nil {
		return err
	}
	return c.JSON(p)
}

// photoDelete deletes the row, then the stored object. An object that cannot
// be deleted is logged and left behind: an orphaned object is harmless, a row
// pointing at a deleted object is not.
func (s *Server) photoDelete(c *fiber.Ctx) error {
	id, err := idParam(c, "id")
	if err != nil {
		return err
	}
	ctrl, err := s.controller(c, "")
	if err != nil {
		return err
	}
	p, err := ctrl.PhotoDelete(c.UserContext(), ctrl.DB(), id)
	if err != nil {
		return err
	}
	if s.deps.Store != nil && p.ObjectKey != "" {
		if err := s.deps.Store.Delete(context.WithoutCancel(c.UserContext()), p.ObjectKey); err != nil && !errors.Is(err, schema.ErrNotFound) {
			s.log.Warn("photo object not deleted", "frontend", ctrl.Name(), "photo_id", id, "key", p.ObjectKey, "err", err)
		}
	}
	return c.SendStatus(http.StatusNoContent)
}

// photoURL builds a photo's URL from its object key (a public URL, or a
// signed one that expires).
func (s *Server) photoURL(ctx context.Context, p *schema.Photo) error {
	if s.deps.Store == nil || p.ObjectKey == "" {
		return nil
	}
	u, err := s.deps.Store.URL(ctx, p.ObjectKey)
	if err != nil {
		return err
	}
	p.URL = u
	return nil
}

// outputURLs builds the URLs of a job's outputs from their object keys.
func (s *Server) outputURLs(ctx context.Context, j *schema.Job) error {
	if s.deps.Store == nil {
		return nil
	}
	for i := range j.Outputs {
		if j.Outputs[i].Key == "" {
			continue
		}
		u, err := s.deps.Store.URL(ctx, j.Outputs[i].Key)
		if err != nil {
			return err
		}
		j.Outputs[i].URL = u
	}
	return nil
}
