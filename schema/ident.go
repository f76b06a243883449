package schema

import (
	"unicode"
	"unicode/utf8"
)

// Identifiers — user ids, idempotency keys, job and node names — are compared
// byte for byte on every database (the MySQL columns are VARBINARY, see the
// migrations). Two ids that print alike must therefore not both be
// accepted: CheckIdent refuses white space at either end ("bob " is not
// "bob", and would look like it) and invisible characters anywhere.

// Identifier bounds, in bytes, as the columns hold them.
const (
	MaxUserIDBytes         = 255 // users.external_id, jobs.user_id
	MaxIdempotencyKeyBytes = 255 // jobs.idempotency_key, credit_ledger.idempotency_key
	MaxJobIDBytes          = 64  // jobs.id, photos.job_id
	MaxNodeNameBytes       = 255 // nodes.name, jobs.node, photos.node
)

// MaxNicknameRunes bounds a user's nickname, in characters (the column holds
// 255 characters of utf8mb4, so 64 of any width fit).
const MaxNicknameRunes = 64

// CheckIdent refuses (a *ValidationError naming field) an identifier that is
// empty, longer than maxBytes, not UTF-8, starts or ends with white space, or
// holds a control or other invisible character. Spaces inside are allowed.
func CheckIdent(field, v string, maxBytes int) error {
	switch {
	case v == "":
		return Invalid(field, "required")
	case len(v) > maxBytes:
		return Invalid(field, "longer than %d bytes", maxBytes)
	case !utf8.ValidString(v):
		return Invalid(field, "not valid UTF-8")
	}
	first, _ := utf8.DecodeRuneInString(v)
	last, _ := utf8.DecodeLastRuneInString(v)
	if unicode.IsSpace(first) || unicode.IsSpace(last) {
		return Invalid(field, "starts or ends with white space")
	}
	for _, r := range v {
		// IsPrint: letters, marks, numbers, punctuation, symbols and the
		// ASCII space; not controls, format characters (zero-width, bidi
		// overrides) or other spaces.
		if !unicode.IsPrint(r) {
			return Invalid(field, "contains a control or invisible character (%U)", r)
		}
	}
	return nil
}
