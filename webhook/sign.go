package webhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"strconv"
	"strings"
)

// Header names of Standard Webhooks.
const (
	HeaderID        = "webhook-id"
	HeaderTimestamp = "webhook-timestamp"
	HeaderSignature = "webhook-signature"
)

// secretPrefix marks a base64 secret, as Standard Webhooks writes them.
const secretPrefix = "whsec_"

// minSecretBytes is the shortest signing key accepted.
const minSecretBytes = 16

// DecodeSecret turns a configured secret into the HMAC key: the base64 after
// "whsec_" when it has that prefix, else the text's own bytes.
func DecodeSecret(s string) ([]byte, error) {
	var key []byte
	if b64, ok := strings.CutPrefix(s, secretPrefix); ok {
		k, err := base64.StdEncoding.DecodeString(b64)
		if err != nil {
			return nil, errors.New("a whsec_ secret must be base64 after the prefix")
		}
		key = k
	} else {
		key = []byte(s)
	}
	if len(key) < minSecretBytes {
		return nil, errors.New("secret shorter than 16 bytes")
	}
	return key, nil
}

// Sign returns the webhook-signature value of one message: "v1," and the
// base64 HMAC-SHA256 of "id.timestamp.body" under key.
func Sign(key []byte, id string, timestamp int64, body []byte) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(id))
	m.Write([]byte{'.'})
	m.Write([]byte(strconv.FormatInt(timestamp, 10)))
	m.Write([]byte{'.'})
	m.Write(body)
	return "v1," + base64.StdEncoding.EncodeToString(m.Sum(nil))
}
