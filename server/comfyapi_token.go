package server

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"strconv"
	"strings"
	"time"
)

// ComfyUI API tokens name a frontend and one of its users, for clients that
// can only be given a base address (/comfy/u/{token}/...). They are signed
// like the events tokens, with their own MAC domain, so neither kind passes
// for the other.
//
// Form: base64url("c1|<frontend>|<unix expiry>|<user id>") "." base64url(mac).
// The user id comes last: it may hold "|".

// Bounds of a ComfyUI API token's lifetime.
const (
	defaultComfyTokenTTL = 24 * time.Hour
	maxComfyTokenTTL     = 30 * 24 * time.Hour
	maxComfyTokenLen     = 1024
)

func (t *tokenSigner) comfyMAC(payload string) []byte {
	m := hmac.New(sha256.New, t.key)
	m.Write([]byte("comfyfarm comfy token\x00"))
	m.Write([]byte(payload))
	return m.Sum(nil)
}

// mintComfy returns a token for user of frontend valid until exp.
func (t *tokenSigner) mintComfy(frontend, user string, exp time.Time) string {
	payload := "c1|" + frontend + "|" + strconv.FormatInt(exp.Unix(), 10) + "|" + user
	return base64.RawURLEncoding.EncodeToString([]byte(payload)) + "." +
		base64.RawURLEncoding.EncodeToString(t.comfyMAC(payload))
}

// checkComfy verifies a ComfyUI API token and returns its frontend and user.
func (t *tokenSigner) checkComfy(token string) (frontend, user string, err error) {
	if len(token) > maxComfyTokenLen {
		return "", "", errTokenMalformed
	}
	p64, m64, ok := strings.Cut(token, ".")
	if !ok {
		return "", "", errTokenMalformed
	}
	payload, err := base64.RawURLEncoding.DecodeString(p64)
	if err != nil {
		return "", "", errTokenMalformed
	}
	mac, err := base64.RawURLEncoding.DecodeString(m64)
	if err != nil {
		return "", "", errTokenMalformed
	}
	if !hmac.Equal(mac, t.comfyMAC(string(payload))) {
		return "", "", errTokenSignature
	}
	parts := strings.SplitN(string(payload), "|", 4)
	if len(parts) != 4 || parts[0] != "c1" || parts[1] == "" || parts[3] == "" {
		return "", "", errTokenMalformed
	}
	exp, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil {
		return "", "", errTokenMalformed
	}
	if !t.now().Before(time.Unix(exp, 0)) {
		return "", "", errTokenExpired
	}
	return parts[1], parts[3], nil
}
