package server

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"strconv"
	"strings"
	"time"
)

// tokenSigner mints and checks event tokens: a job id, the frontend it
// belongs to and an expiry, signed with HMAC-SHA256. A token lets a browser
// follow one job's events without the frontend's key.
//
// Form: base64url("v1|<job>|<frontend>|<unix expiry>") "." base64url(mac).
type tokenSigner struct {
	key []byte
	ttl time.Duration
	now func() time.Time
}

var (
	errTokenMalformed = errors.New("malformed token")
	errTokenSignature = errors.New("bad token signature")
	errTokenExpired   = errors.New("token expired")
	errTokenOtherJob  = errors.New("token is for another job")
)

func (t *tokenSigner) mint(jobID, frontend string) string {
	exp := t.now().Add(t.ttl).Unix()
	payload := "v1|" + jobID + "|" + frontend + "|" + strconv.FormatInt(exp, 10)
	return base64.RawURLEncoding.EncodeToString([]byte(payload)) + "." +
		base64.RawURLEncoding.EncodeToString(t.mac(payload))
}

func (t *tokenSigner) mac(payload string) []byte {
	m := hmac.New(sha256.New, t.key)
	m.Write([]byte("comfyfarm events token\x00"))
	m.Write([]byte(payload))
	return m.Sum(nil)
}

// check verifies a token for jobID and returns the frontend it was minted for.
func (t *tokenSigner) check(token, jobID string) (string, error) {
	if len(token) > 512 {
		return "", errTokenMalformed
	}
	p64, m64, ok := strings.Cut(token, ".")
	if !ok {
		return "", errTokenMalformed
	}
	payload, err := base64.RawURLEncoding.DecodeString(p64)
	if err != nil {
		return "", errTokenMalformed
	}
	mac, err := base64.RawURLEncoding.DecodeString(m64)
	if err != nil {
		return "", errTokenMalformed
	}
	if !hmac.Equal(mac, t.mac(string(payload))) {
		return "", errTokenSignature
	}
	parts := strings.Split(string(payload), "|")
	if len(parts) != 4 || parts[0] != "v1" {
		return "", errTokenMalformed
	}
	exp, err := strconv.ParseInt(parts[3], 10, 64)
	if err != nil {
		return "", errTokenMalformed
	}
	if !t.now().Before(time.Unix(exp, 0)) {
		return "", errTokenExpired
	}
	if parts[1] != jobID {
		return "", errTokenOtherJob
	}
	return parts[2], nil
}
