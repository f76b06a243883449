package server

import (
	"net/http"
	"net/mail"
	"net/url"
	"unicode/utf8"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

// userBody is PUT /users/{id}: the profile replaces the stored one.
type userBody struct {
	Frontend  string `json:"frontend"`
	Nickname  string `json:"nickname"`
	Email     string `json:"email"`
	AvatarURL string `json:"avatar_url"`
}

func (b *userBody) validate() error {
	if utf8.RuneCountInString(b.Nickname) > schema.MaxNicknameRunes || !utf8.ValidString(b.Nickname) {
		return schema.Invalid("nickname", "at most %d characters of UTF-8", schema.MaxNicknameRunes)
	}
	if b.Email != "" {
		if len(b.Email) > 254 {
			return schema.Invalid("email", "longer than 254 bytes")
		}
		a, err := mail.ParseAddress(b.Email)
		if err != nil || a.Address != b.Email {
			return schema.Invalid("email", "not a plain e-mail address")
		}
	}
	if b.AvatarURL != "" {
		if len(b.AvatarURL) > 2048 {
			return schema.Invalid("avatar_url", "longer than 2048 bytes")
		}
		u, err := url.Parse(b.AvatarURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return schema.Invalid("avatar_url", "must be an absolute http or https URL")
		}
	}
	return nil
}

// userPut upserts a user's profile; a new user starts with the frontend's
// initial credits.
func (s *Server) userPut(c *fiber.Ctx) error {
	id, err := param(c, "id")
	if err != nil {
		return err
	}
	if err := checkUserID("id", id); err != nil {
		return err
	}
	var b userBody
	if err := decodeJSON(c, &b); err != nil {
		return err
	}
	if err := b.validate(); err != nil {
		return err
	}
	ctrl, err := s.controller(c, b.Frontend)
	if err != nil {
		return err
	}
	u, err := ctrl.UserUpsert(c.UserContext(), ctrl.DB(), &schema.User{
		ExternalID: id,
		Nickname:   b.Nickname,
		Email:      b.Email,
		AvatarURL:  b.AvatarURL,
	})
	if err != nil {
		return err
	}
	return c.JSON(u)
}

// userGet returns the user view: profile, credits and photo count.
func (s *Server) userGet(c *fiber.Ctx) error {
	id, err := param(c, "id")
	if err != nil {
		return err
	}
	if err := checkUserID("id", id); err != nil {
		return err
	}
	ctrl, err := s.controller(c, "")
	if err != nil {
		return err
	}
	u, err := ctrl.UserGet(c.UserContext(), ctrl.DB(), id)
	if err != nil {
		return err
	}
	return c.JSON(u)
}

// creditsBody is POST /users/{id}/credits.
type creditsBody struct {
	Frontend string `json:"frontend"`
	Delta    int64  `json:"delta"`
	Reason   string `json:"reason"`
}

// maxCreditDelta bounds one credit change, far from int64 overflow.
const maxCreditDelta = 1_000_000_000_000

// userCredits applies a credit change (a top-up after a payment) once per
// Idempotency-Key: replaying the same key returns the same entry; the same key
// with another delta is 409.
func (s *Server) userCredits(c *fiber.Ctx) error {
	id, err := param(c, "id")
	if err != nil {
		return err
	}
	if err := checkUserID("id", id); err != nil {
		return err
	}
	key := header(c, "Idempotency-Key")
	if key == "" {
		return newAPIError(http.StatusBadRequest, "missing_idempotency_key",
			"credit changes need an Idempotency-Key header")
	}
	if err := checkIdempotencyKey(key); err != nil {
		return err
	}
	var b creditsBody
	if err := decodeJSON(c, &b); err != nil {
		return err
	}
	if b.Delta == 0 {
		return schema.Invalid("delta", "required and not zero")
	}
	if b.Delta > maxCreditDelta || b.Delta < -maxCreditDelta {
		return schema.Invalid("delta", "out of range")
	}
	if len(b.Reason) > 255 || !utf8.ValidString(b.Reason) {
		return schema.Invalid("reason", "at most 255 bytes of UTF-8")
	}
	ctrl, err := s.controller(c, b.Frontend)
	if err != nil {
		return err
	}
	entry, err := ctrl.CreditsApply(c.UserContext(), ctrl.DB(), dbcontrollers.CreditParams{
		UserID:         id,
		Delta:          b.Delta,
		Reason:         b.Reason,
		IdempotencyKey: key,
	})
	if err != nil {
		return err
	}
	return c.JSON(entry)
}
