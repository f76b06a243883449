package server

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
)

// principal is who a request acts as: the admin, or one frontend.
type principal struct {
	admin    bool
	frontend string // set for a frontend key
	key      int    // the key's index in the keyring: which key, for rate limits
}

type keyEntry struct {
	digest   [sha256.Size]byte
	who      principal
	rateKeys [limitKinds]string // the key's shared rate limits, by kind; see rateIDs
}

// keyring holds the SHA-256 digests of every key. A presented key is hashed
// and compared with every digest in constant time, so neither the keys nor
// their number of matching bytes leak through timing.
type keyring struct {
	entries []keyEntry
}

func newKeyring(adminKey string, frontendKeys map[string][]string) (*keyring, error) {
	if adminKey == "" {
		return nil, errors.New("admin key is empty")
	}
	k := &keyring{}
	seen := map[string]string{}
	add := func(key string, who principal, owner string) error {
		if key == "" {
			return fmt.Errorf("%s has an empty api key", owner)
		}
		if prev, ok := seen[key]; ok {
			return fmt.Errorf("%s and %s share an api key", prev, owner)
		}
		seen[key] = owner
		who.key = len(k.entries)
		k.entries = append(k.entries, keyEntry{digest: sha256.Sum256([]byte(key)), who: who})
		return nil
	}
	if err := add(adminKey, principal{admin: true}, "the admin"); err != nil {
		return nil, err
	}
	for name, keys := range frontendKeys {
		if !schema.ValidFrontendName(name) {
			return nil, fmt.Errorf("invalid frontend name %q", name)
		}
		for _, key := range keys {
			if err := add(key, principal{frontend: name}, "frontend "+name); err != nil {
				return nil, err
			}
		}
	}
	return k, nil
}

// rateIDs names each key's rate limits where replicas share them (Redis):
// an HMAC of the key's digest under the secret all replicas share, so the
// same key has the same name on every replica and its name does not reveal
// it, even a weak one, to whoever reads Redis.
func (k *keyring) rateIDs(secret []byte) {
	for i := range k.entries {
		m := hmac.New(sha256.New, secret)
		m.Write([]byte("rate limit\x00"))
		m.Write(k.entries[i].digest[:])
		id := hex.EncodeToString(m.Sum(nil)[:16])
		k.entries[i].rateKeys = [limitKinds]string{limitRequests: "rate:req:" + id, limitSubmits: "rate:sub:" + id}
	}
}

// lookup finds the principal of a presented key.
func (k *keyring) lookup(key string) (principal, bool) {
	d := sha256.Sum256([]byte(key))
	var found principal
	ok := 0
	for _, e := range k.entries {
		if subtle.ConstantTimeCompare(d[:], e.digest[:]) == 1 {
			found = e.who
			ok = 1
		}
	}
	return found, ok == 1
}

const localPrincipal = "comfyfarm.principal"

// bearer returns the key of an "Authorization: Bearer <key>" header.
func bearer(c *fiber.Ctx) (string, bool) {
	h := c.Get(fiber.HeaderAuthorization)
	if h == "" {
		return "", false
	}
	scheme, key, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "bearer") {
		return "", false
	}
	key = strings.TrimSpace(key)
	return key, key != ""
}

// principal authenticates the request's bearer key: 401 without a known key.
func (s *Server) principal(c *fiber.Ctx) (principal, error) {
	key, ok := bearer(c)
	if !ok {
		c.Set(fiber.HeaderWWWAuthenticate, `Bearer realm="comfyfarm"`)
		return principal{}, newAPIError(http.StatusUnauthorized, "unauthorized", "missing api key: send Authorization: Bearer <key>")
	}
	who, ok := s.keys.lookup(key)
	if !ok {
		c.Set(fiber.HeaderWWWAuthenticate, `Bearer realm="comfyfarm", error="invalid_token"`)
		return principal{}, newAPIError(http.StatusUnauthorized, "unauthorized", "unknown api key")
	}
	return who, nil
}

// authenticate is the middleware of every keyed route: it finds the key's
// principal (401 without one), then spends one request of the key's rate
// limit (429 beyond it).
func (s *Server) authenticate(c *fiber.Ctx) error {
	who, err := s.principal(c)
	if err != nil {
		return err
	}
	c.Locals(localPrincipal, who)
	if err := s.limit(c, who, limitRequests); err != nil {
		return err
	}
	return c.Next()
}

// requireAdmin follows authenticate on admin-only routes.
func (s *Server) requireAdmin(c *fiber.Ctx) error {
	if who, _ := c.Locals(localPrincipal).(principal); !who.admin {
		return newAPIError(http.StatusForbidden, "forbidden", "this route needs the admin key")
	}
	return c.Next()
}

func principalOf(c *fiber.Ctx) principal {
	who, _ := c.Locals(localPrincipal).(principal)
	return who
}

// frontendName decides which frontend a request acts for: the `frontend`
// query parameter, or bodyFrontend (a field of the request body), or — for a
// frontend key that names none — the key's own frontend. It checks the name's
// form (400 invalid_frontend), that it exists (404 unknown_frontend) and that
// the key may act for it (403).
func (s *Server) frontendName(c *fiber.Ctx, bodyFrontend string) (string, error) {
	who := principalOf(c)
	name := query(c, "frontend")
	if bodyFrontend != "" {
		if name != "" && name != bodyFrontend {
			return "", newAPIError(http.StatusBadRequest, "invalid_frontend",
				"the frontend query parameter and body field differ")
		}
		name = bodyFrontend
	}
	if name == "" {
		if who.admin {
			return "", newAPIError(http.StatusBadRequest, "invalid_frontend",
				"the admin key must name the frontend (query parameter or body field frontend)")
		}
		name = who.frontend
	}
	if !schema.ValidFrontendName(name) {
		return "", newAPIError(http.StatusBadRequest, "invalid_frontend",
			"frontend must match ^[a-z][a-z0-9_]{0,31}$")
	}
	if _, err := s.deps.Frontends.Get(name); err != nil {
		if errors.Is(err, schema.ErrUnknownFrontend) {
			return "", newAPIError(http.StatusNotFound, "unknown_frontend", "unknown frontend").with("frontend", name)
		}
		return "", err
	}
	if !who.admin && who.frontend != name {
		return "", newAPIError(http.StatusForbidden, "forbidden", "this key is not valid for frontend "+name)
	}
	return name, nil
}

// controller resolves the frontend as frontendName does and returns its controller.
func (s *Server) controller(c *fiber.Ctx, bodyFrontend string) (dbcontrollers.Controller, error) {
	name, err := s.frontendName(c, bodyFrontend)
	if err != nil {
		return nil, err
	}
	return s.deps.Frontends.Get(name)
}
